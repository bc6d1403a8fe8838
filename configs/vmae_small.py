# The small VMAE, stage 1 (masked pre-training): under two minutes on a laptop CPU (the demo's first stage).
# The schedule is in optimizer steps, so a folder of your own photos trains as long as the built-in set:
#   python train_vmae.py configs/vmae_small.py --data my_photos
# LPIPS is off because its VGG16 weights are a download; with them, try perceptual_weight = 0.5.
# Follow it with configs/vmae_small_stage3.py (decoder fine-tuning): together they beat a thumbnail.
data = 'builtin'
image_size = 32
model = 'VMAE-small'
out_dir = 'out/vmae_small'
perceptual_weight = 0.0
batch_size = 64
micro_batch_size = 64
blr = 1.2e-2             # lr = 1.2e-2 x 64 / 256 = 3e-3: a short run wants a high rate
max_steps = 1000
warmup_steps = 80
dtype = 'fp32'
num_workers = 1
log_every = 100
image_every = 500
ckpt_every = 500
