"""What runs on a node: the agent (one per node), its torch-preloaded zygote, and the ranks.

Nothing here imports IPython. The kernel starts ``python -m lepton_magic.agent`` through a
backend and talks to it over the agent's stdin/stdout with :mod:`lepton_magic.protocol` frames.
"""
