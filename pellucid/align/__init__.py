"""Alignment: oracle rankers, the reward model, DPO, and a model's lineage report."""
