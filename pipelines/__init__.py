"""Pure domain of dealpulse: the event contract, keyword tagging, the synthetic world and the store.

Nothing here imports Faust; I/O lives at the edges (the store writer and `dealpulse.agents`).
"""
