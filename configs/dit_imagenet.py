# DiT-B/1 on ImageNet 256 VMAE latents (16 x 32 x 32), as the paper: lr 2e-4 constant, batch 1024, 100k steps,
# QK-norm, EMA 0.9999. 8 GPUs x 128 = 1024 per step (use micro_batch_size 64 and 2x accumulation on smaller GPUs).
image_size = 256
out_dir = 'out/dit_imagenet'
model = 'DiT-B/1'
qk_norm = True
class_dropout_prob = 0.1
batch_size = 1024
micro_batch_size = 128
lr = 2e-4
beta2 = 0.95
ema_decay = 0.9999
max_steps = 100000
ckpt_every = 10000
keep_every = 20000
sample_every = 10000
