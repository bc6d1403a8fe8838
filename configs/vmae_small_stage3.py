# The small VMAE, stage 3: the decoder alone fine-tuned on unmasked images and the posterior mean, as the
# paper's last stage (encoder frozen, so the latents, and a DiT trained on them, stay the same). About two minutes:
#   python train_vmae.py configs/vmae_small_stage3.py --init_from out/vmae_small/last.pt
data = 'builtin'
image_size = 32
model = 'VMAE-small'
out_dir = 'out/vmae_small_stage3'
mask_ratio = 0.0
sample_posterior = False
visible_weight = 1.0
mask_weight = 0.0
perceptual_weight = 0.0
kl_weight = 0.0
train_encoder = False
batch_size = 64
micro_batch_size = 64
blr = 1.2e-2
max_steps = 1600
warmup_steps = 20
dtype = 'fp32'
num_workers = 1
log_every = 100
image_every = 800
ckpt_every = 800
