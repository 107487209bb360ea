"""Training loops: the jitted SGD trainer for autoencoder-style decomposers (`trainers.sgd`), the semi-NMF
solver (`trainers.snmf`), and their shared pieces: optimiser and schedule (`optim`), orbax checkpoints
(`checkpoint`), logs (`logging`), device meshes (`sharding`), input scaling (`scaling`), batch sources (`data`).

Trainers import the decomposers and the activation data path, never the evaluation suite.
"""
