"""Trainer: a pre-LN decoder-only GPT under SP, µP and the α-parameterizations of CompleteP (Table 1).

The package knows nothing of probes or analyses: the training loop calls observers through the small
protocol in `trainer.observers`.
"""
