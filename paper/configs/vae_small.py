# The VAE baseline (paper App. A, Eq. 5), small: the AE of ae_small.py decoding a posterior sample, with
# the textbook KL to N(0, I). About five minutes on a laptop CPU:
#   python -m paper.train_convae paper/configs/vae_small.py
# kl_weight: the paper gives none. With LDM's summed losses, squared error + w x KL is the ELBO of a
# Gaussian decoder of variance w / 2; w = 0.01 is a std of 0.07 on the [-1, 1] scale, about the error
# of the paper's VAE (MSE 0.0018 on [0, 1], Table 1).
data = 'builtin'
image_size = 32
model = 'ConvAE-small'
out_dir = 'out/vae_small'
sample_posterior = True
pixel_loss = 'mse'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 0.01
kl_standard = True
batch_size = 64
micro_batch_size = 64
blr = 4e-3               # lr = 4e-3 x 64 / 256 = 1e-3
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
max_steps = 1000
warmup_steps = 80
dtype = 'fp32'
num_workers = 1
log_every = 100
image_every = 500
ckpt_every = 500
