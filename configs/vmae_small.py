# The small VMAE on the built-in dataset: about three minutes on a laptop CPU (the demo's first stage).
# LPIPS is off because its VGG16 weights are a download; with them, try perceptual_weight = 0.5.
data = 'builtin'
image_size = 32
model = 'VMAE-small'
out_dir = 'out/vmae_small'
perceptual_weight = 0.0
batch_size = 64
micro_batch_size = 64
blr = 1.2e-2             # lr = 1.2e-2 x 64 / 256 = 3e-3: a short run wants a high rate
warmup_epochs = 0.5
epochs = 4.5             # 700 steps
dtype = 'fp32'
num_workers = 1
log_every = 100
image_every = 350
ckpt_every = 350
