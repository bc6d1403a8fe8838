# The small VMAE on the built-in dataset: a few minutes on a laptop CPU.
# LPIPS is off because its VGG16 weights are a download; with them, try perceptual_weight = 0.5.
data = 'builtin'
image_size = 32
model = 'VMAE-small'
out_dir = 'out/vmae_small'
perceptual_weight = 0.0
batch_size = 64
micro_batch_size = 64
blr = 4e-3               # lr = 4e-3 x 64 / 256 = 1e-3
warmup_epochs = 0.5
epochs = 8.0
dtype = 'fp32'
num_workers = 1
log_every = 50
image_every = 250
ckpt_every = 250
