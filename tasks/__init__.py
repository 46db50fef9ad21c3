"""Prefect tasks, one per step of a round: score, mask, dispatch, client_train, aggregate,
evaluate, checkpoint. Each loads its inputs by reference, makes one or two `fedprune_core` calls,
stores the result and returns a reference plus small metrics; no tensor crosses Prefect."""
