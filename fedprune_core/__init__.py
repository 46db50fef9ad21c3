"""fedprune_core: the pure-torch engine of Federated Pruning.

Implements Lin et al., "Federated Pruning: Improving Neural Network Efficiency with
Federated Learning" (Interspeech 2022, arXiv 2209.06359): server-side importance scores,
structured masks, uniform or adaptive sparsity, the sparsify / refine / fine-tune schedule,
physically smaller client submodels and masked FedAvg, plus the baselines it is compared with.

Nothing here touches files, servers or global state; `flows/`, `tasks/` and `infra/` build on it.
"""
