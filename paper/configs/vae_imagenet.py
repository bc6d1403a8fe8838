# The VAE baseline at the paper's scale: ae_imagenet.py decoding a posterior sample, plus 0.01 x the
# textbook KL to N(0, I) (a Gaussian decoder of std 0.07; see vae_small.py for the choice):
#   torchrun --standalone --nproc_per_node=8 -m paper.train_convae paper/configs/vae_imagenet.py --data /data/imagenet/train
image_size = 256
model = 'SD3-VAE'
out_dir = 'out/vae'
sample_posterior = True
pixel_loss = 'mse'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 0.01
kl_standard = True
batch_size = 2048
micro_batch_size = 32
blr = 1e-5
min_lr = 8e-5            # = the lr: constant after warm-up
warmup_epochs = 1.0
epochs = 20.0
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
