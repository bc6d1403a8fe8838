# The AE baseline at the paper's scale: SD3's convolutional autoencoder (83.8M), squared error alone,
# the posterior mean decoded. Global batch 2048, base lr 1e-5 (lr 8e-5), constant as LDM's (App. B.1):
#   torchrun --standalone --nproc_per_node=8 -m paper.train_convae paper/configs/ae_imagenet.py --data /data/imagenet/train
# The paper gives no epochs (24 hours on 8 A100s); 20 is our choice. Adam with LDM's betas, no decay.
image_size = 256
model = 'SD3-VAE'
out_dir = 'out/ae'
sample_posterior = False
pixel_loss = 'mse'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 0.0
batch_size = 2048
micro_batch_size = 32
blr = 1e-5
min_lr = 8e-5            # = the lr: constant after warm-up
warmup_epochs = 1.0
epochs = 20.0
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
