# The DAE baseline at the paper's scale: ae_imagenet.py with Gaussian noise (std 0.1 on the [-1, 1]
# scale; the paper gives no level) on the input and the clean image as the target:
#   torchrun --standalone --nproc_per_node=8 -m paper.train_convae paper/configs/dae_imagenet.py --data /data/imagenet/train
image_size = 256
model = 'SD3-VAE'
out_dir = 'out/dae'
sample_posterior = False
pixel_loss = 'mse'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 0.0
input_noise_std = 0.1
batch_size = 2048
micro_batch_size = 32
blr = 1e-5
min_lr = 8e-5            # = the lr: constant after warm-up
warmup_epochs = 1.0
epochs = 20.0
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
