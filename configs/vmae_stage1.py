# Stage 1: masked VAE pre-training at 128 px, as the authors ran it (their VMAE/train_ae.sh).
# 8 GPUs x 128 images x 2 accumulation = 2048 per step; lr = 1e-4 x 2048 / 256 = 8e-4.
model = 'VMAE-f8d16'
image_size = 128
out_dir = 'out/vmae_stage1'
mask_ratio = 0.25
sample_posterior = True
mask_weight = 0.5
visible_weight = 0.5
perceptual_weight = 0.5
kl_weight = 1e-6
kl_target_std = 1e-3
batch_size = 2048
micro_batch_size = 128
blr = 1e-4
warmup_epochs = 10.0
epochs = 400.0
stop_epoch = 91.0        # the authors used checkpoint-90 (91 epochs of the 400-epoch cosine); 0 runs all 400
weight_decay = 0.05
keep_every = 6250        # keep a copy every 10 epochs of ImageNet (625 steps per epoch)
