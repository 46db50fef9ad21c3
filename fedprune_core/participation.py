"""Which sampled clients take part in a round: the client-failure policy.

A client that fails (bad data, a lost worker, an exception) or misses the round's deadline is
left out of its round; the round aggregates the clients that finished if at least `min_clients`
did (Flower's `accept_failures`, with a floor). Otherwise the round is tried again, its failed
clients sent again, up to `round_tries` times; then the run stops, naming the clients.

A round that left a client out is recorded (`RoundParticipation`), and a round run again after a
resume trains exactly the recorded clients, so it ends bit for bit where it did the first time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedprune_core.config import FederatedConfig


class RoundFailedError(RuntimeError):
    """Fewer than `min_clients` clients finished a round in all its tries."""


def min_clients(config: FederatedConfig) -> int:
    """How many sampled clients must finish for a round to aggregate."""
    if config.min_clients is not None:
        return config.min_clients
    return max(1, math.ceil(config.clients_per_round / 2))


@dataclass(frozen=True)
class RoundParticipation:
    """Who took part in one round.

    Attributes:
        round_num: the round.
        sampled: the clients sampled, ascending.
        done: the clients whose updates were aggregated, ascending.
        failed: client -> why it was left out (one line), for the sampled clients not in `done`.
    """

    round_num: int
    sampled: tuple[int, ...]
    done: tuple[int, ...]
    failed: Mapping[int, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every sampled client took part."""
        return len(self.done) == len(self.sampled)

    def summary(self) -> str:
        """One line: how many took part, and who was left out why."""
        reasons = "; ".join(f"client {c}: {why}" for c, why in sorted(self.failed.items()))
        left = f", left out {reasons}" if reasons else ""
        return f"round {self.round_num}: {len(self.done)} of {len(self.sampled)} clients took part{left}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (client ids of `failed` become strings, as JSON keys are)."""
        return {"round": self.round_num, "sampled": list(self.sampled), "done": list(self.done),
                "failed": {str(c): why for c, why in sorted(self.failed.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundParticipation:
        """Inverse of `to_json`."""
        failed = {int(c): str(why) for c, why in data.get("failed", {}).items()}
        return cls(int(data["round"]), tuple(data["sampled"]), tuple(data["done"]), failed)


def one_line(error: BaseException, limit: int = 200) -> str:
    """An error as one short line: its type and the first line of its message."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decide(
    round_num: int,
    sampled: Sequence[int],
    finished: Sequence[int],
    failed: Mapping[int, str],
    config: FederatedConfig,
    recorded: RoundParticipation | None = None,
) -> RoundParticipation | None:
    """The round's participation once its clients have finished or failed, or None to try again.

    Args:
        round_num: the round.
        sampled: the clients sampled for it.
        finished: the clients whose training finished (in any try).
        failed: client -> reason, for the clients that failed in the latest try.
        config: `min_clients` applies.
        recorded: the participation recorded when this round ran before (a resumed run): then
            exactly its clients must finish.

    Returns:
        Who takes part, or None when the round must be tried again (too few finished, or a
        recorded client has not finished yet).
    """
    done = tuple(sorted(set(finished)))
    if recorded is not None:
        return recorded if set(recorded.done) <= set(done) else None
    if len(done) < min_clients(config):
        return None
    left_out = {c: failed.get(c, "did not finish") for c in sampled if c not in done}
    return RoundParticipation(round_num, tuple(sorted(sampled)), done, left_out)


def round_failed_message(round_num: int, failed: Mapping[int, str], finished: int, needed: int, tries: int) -> str:
    """The one-paragraph reason a run stops when a round cannot be made."""
    named = "; ".join(f"client {c}: {why}" for c, why in sorted(failed.items()))
    return (
        f"round {round_num}: {finished} of the sampled clients finished in {tries} tries, {needed} needed "
        f"(federated.min_clients); failed: {named}. Fix those clients' data or workers, or lower "
        "federated.min_clients, then resume the run"
    )


def participation_csv(records: Sequence[RoundParticipation]) -> str:
    """The rounds that left a client out, one row per sampled client: round, client, status, reason."""
    lines = ["round,client,status,reason"]
    for p in records:
        for c in p.sampled:
            reason = p.failed.get(c, "").replace('"', "'")
            lines.append(f'{p.round_num},{c},{"done" if c in p.done else "left_out"},"{reason}"')
    return "\n".join(lines) + "\n"
