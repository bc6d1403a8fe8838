# A small DiT on the built-in dataset's latents (VMAE-small, 32 px -> 16 x 4 x 4): minutes on a laptop CPU.
data = 'builtin'
image_size = 32
out_dir = 'out/dit_small'
model = 'DiT-T/1'
batch_size = 128
micro_batch_size = 128
lr = 2e-3               # a short run on tiny latents takes a high rate
ema_decay = 0.995       # a 2000-step run needs a short EMA (0.9999 would still be 82% the initial weights)
max_steps = 2000
dtype = 'fp32'
num_workers = 1
log_every = 100
ckpt_every = 1000
keep_every = 0
sample_every = 1000
