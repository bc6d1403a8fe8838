# Stage 3: fine-tuning at 256 px with the posterior mean, MSE + 10 x LPIPS, no mask, no KL.
# Start from the stage-1 weights with --init_from (its 16x16 position tables are resized to 32x32).
# 8 GPUs x 16 images x 16 accumulation = 2048 per step; lr = 1e-5 x 2048 / 256 = 8e-5, cosine over 10 epochs.
model = 'VMAE-f8d16'
image_size = 256
out_dir = 'out/vmae_stage3'
mask_ratio = 0.0
sample_posterior = False
visible_weight = 1.0
mask_weight = 0.0
perceptual_weight = 10.0
kl_weight = 0.0
train_encoder = False    # decoder only, as the paper says; the authors' released code trained the encoder too (set True)
batch_size = 2048
micro_batch_size = 16
blr = 1e-5
warmup_epochs = 0.0
epochs = 10.0
ckpt_every = 625
keep_every = 625
