"""Submodels: what a client downloads, trains and uploads (Lin et al. 2022, Sec. 2.1; Caldas et al. 2018).

One module per job, their public names re-exported here:

- `payload`: the wire format; the server's `extract` and `expand`, group ids, packed bits, blocks.
- `sliced`: the physically smaller layers a client trains, with their autograd functions.
- `assemble`: a client's model built from a payload (`build_client_model`) and its upload
  (`client_update`).
"""

from fedprune_core.submodel.assemble import ClientModel, build_client_model, client_update, kept_unit_scale
from fedprune_core.submodel.payload import (
    SEP,
    decode_mask,
    expand,
    extract,
    float_entries,
    groups_to_mask,
    linear_blocks,
    mask_to_groups,
    pack_bits,
    payload_blocks,
    payload_nbytes,
    unpack_bits,
)
from fedprune_core.submodel.sliced import (
    Block,
    ChannelSlicedConv2d,
    SlicedLinear,
    SlicedMultiheadAttention,
    SlicedPointwiseConv1d,
    dense_linear,
    linear_weight,
    read_columns,
    take_columns,
)

__all__ = [
    "SEP",
    "Block",
    "ChannelSlicedConv2d",
    "ClientModel",
    "SlicedLinear",
    "SlicedMultiheadAttention",
    "SlicedPointwiseConv1d",
    "build_client_model",
    "client_update",
    "decode_mask",
    "dense_linear",
    "expand",
    "extract",
    "float_entries",
    "groups_to_mask",
    "kept_unit_scale",
    "linear_blocks",
    "linear_weight",
    "mask_to_groups",
    "pack_bits",
    "payload_blocks",
    "payload_nbytes",
    "read_columns",
    "take_columns",
    "unpack_bits",
]
