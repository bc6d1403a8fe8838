import torch

# The test models are tiny: one thread is faster than two and does not stall when the machine is busy.
torch.set_num_threads(1)
