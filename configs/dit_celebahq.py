# DiT-B/1 on CelebA-HQ 256 (a flat folder: unconditional), as the authors: batch 1024, 60k steps, no QK-norm.
image_size = 256
out_dir = 'out/dit_celebahq'
model = 'DiT-B/1'
qk_norm = False
batch_size = 1024
micro_batch_size = 128
lr = 2e-4
ema_decay = 0.9999
max_steps = 60000
ckpt_every = 10000
keep_every = 20000
sample_every = 10000
