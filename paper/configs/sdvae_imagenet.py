# The SD-VAE baseline at the paper's scale: LDM's kl-f8 objective on SD3's autoencoder. L1 + LPIPS +
# 1e-6 x KL on posterior samples; from step 50001 a PatchGAN (hinge loss, adaptive weight x 0.5).
# Global batch 256 for the adversarial training and base lr 1e-5 (App. B.1), constant as LDM's:
#   torchrun --standalone --nproc_per_node=8 -m paper.train_convae paper/configs/sdvae_imagenet.py --data /data/imagenet/train
image_size = 256
model = 'SD3-VAE'
out_dir = 'out/sdvae'
sample_posterior = True
pixel_loss = 'l1'
pixel_weight = 1.0
perceptual_weight = 1.0
kl_weight = 1e-6
kl_standard = True
disc_weight = 0.5
disc_start = 50001
batch_size = 256
micro_batch_size = 32
blr = 1e-5
min_lr = 1e-5            # = the lr: constant after warm-up
warmup_epochs = 0.0
epochs = 20.0
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
