"""Denoising diffusion in latent space, trained through the textual-inversion vectors or pretrained whole.

`DDPM` holds the noise schedule and the denoising loss; `LatentDiffusion` adds the frozen autoencoder
(first stage), the text encoder (cond stage) and the `EmbeddingManager`. Two ways to train it:
- textual inversion (a `personalization_config`): the pseudo-word vectors are the only trainable parameters
  unless `unfreeze_model` also opens the UNet and text encoder at `model_lr`;
- pretraining (no `personalization_config`, `unfreeze_model: true`): the UNet, and the text encoder when
  `cond_stage_trainable`, learn at `learning_rate`, with an EMA copy of the UNet (`use_ema`) as LDM kept one.
Module and buffer names follow CompVis latent-diffusion so original checkpoints load key for key.
"""
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.checkpoint import LoadedCheckpoint, build_filled_by, load_checkpoint, restore
from ldm.images import channels_first, log_txt_as_img
from ldm.modules.cuda_graphs import GraphedUNet
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.encoders.modules import TextConditioner
from ldm.modules.weight_offload import WeightOffload, unet_blocks
from ldm.random_streams import BatchPositions, batches_per_step, step_generator
from ldm.util import count_params, instantiate_from_config

FROZEN_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `compile_unet`: false, true (torch.compile's default mode) or a mode; "reduce-overhead" adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_SEED = 23  # the original's; main.py seeds the data order with it too
GRAPHS_WITH_OFFLOAD = "cuda_graphs cannot replay an offloaded UNet (its weights move every step): set {}: false"


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (`LatentDiffusion.train` keeps it there)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DiffusionWrapper(torch.nn.Module):
    """Routes conditioning into the UNet (`model.diffusion_model` in checkpoints)."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid"):
            raise ValueError(f"conditioning_key '{conditioning_key}' is not supported: use crossattn (text), concat, hybrid or null")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        self.graphed_unet = None  # a GraphedUNet once `use_cuda_graphs()` is called
        self.weight_offload = None  # a WeightOffload once `offload_weights()` is called
        self.memory_format = torch.contiguous_format  # of the UNet's convolution weights and input (`use_channels_last`)
        # Where the model was last moved: the device an offloaded UNet computes on.
        self.register_buffer("device_marker", torch.empty(0), persistent=False)

    def use_cuda_graphs(self, enabled: bool = True, **options):
        """Replay the UNet's passes as CUDA graphs where they apply (ldm/modules/cuda_graphs.py), or stop."""
        if enabled and self.weight_offload is not None:
            raise ValueError(GRAPHS_WITH_OFFLOAD.format("offload_unet"))
        self.graphed_unet = GraphedUNet(self.diffusion_model, **options) if enabled else None

    def use_channels_last(self, enabled: bool = True):
        """Store the UNet's convolution weights and feed it latents channels-last (NHWC), the layout tensor-core
        convolutions compute in, instead of letting cuDNN transpose around each one; or go back to NCHW."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # through `_apply`: graphs cleared, offloaded copies re-parked

    def offload_weights(self):
        """Keep the UNet's weights in CPU memory, each block's visiting the device while it computes
        (ldm/modules/weight_offload.py)."""
        if self.graphed_unet is not None:
            raise ValueError(GRAPHS_WITH_OFFLOAD.format("cuda_graphs"))
        self.weight_offload = WeightOffload(unet_blocks(self.diffusion_model))
        self.weight_offload.park(self.device_marker.device)

    def _apply(self, fn, *args, **kwargs):
        if self.graphed_unet is not None:  # recorded kernels read the weights where they were
            self.graphed_unet.clear()
        module = super()._apply(fn, *args, **kwargs)
        if self.weight_offload is not None:  # moved or cast: back to CPU memory, computing where the model is
            self.weight_offload.park(self.device_marker.device)
        return module

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        if self.conditioning_key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(c_crossattn, dim=1) if self.conditioning_key in ("crossattn", "hybrid") else None
        x = x.contiguous(memory_format=self.memory_format)
        if self.weight_offload is not None:
            with self.weight_offload.saving():
                return self.diffusion_model(x, t, context=context)
        unet = self.diffusion_model if self.graphed_unet is None else self.graphed_unet
        return unet(x, t, context=context)


DEFAULT_TIMESTEPS = 1000


def fused_adamw(params, trainer) -> bool:
    """AdamW as one fused kernel per step on a GPU instead of a dozen (at batch 1 a step is bound by launches),
    unless gradients are clipped (`gradient_clip_val`): Lightning's mixed precision refuses to clip for a fused
    optimizer."""
    clipping = trainer is not None and bool(trainer.gradient_clip_val)
    return not clipping and all(p.is_cuda for p in params)


class DDPM(pl.LightningModule):
    """Noise schedule, forward noising and the epsilon-prediction loss: the base of LatentDiffusion, which
    restores `ckpt_path` once it has built all its parts."""

    def __init__(
        self,
        unet_config,
        timesteps=DEFAULT_TIMESTEPS,
        beta_schedule="linear",
        loss_type="l2",
        ckpt_path=None,
        ignore_keys=(),
        monitor=None,
        use_ema=False,
        first_stage_key="image",
        image_size=256,
        channels=3,
        log_every_t=100,
        linear_start=1e-4,
        linear_end=2e-2,
        cosine_s=8e-3,
        original_elbo_weight=0.0,
        v_posterior=0.0,
        l_simple_weight=1.0,
        conditioning_key=None,
        parameterization="eps",
        embedding_reg_weight=0.0,
        unfreeze_model=False,
        model_lr=0.0,
        seed=DEFAULT_SEED,
        **ignored,
    ):
        super().__init__()
        if ignored:  # original config keys we do not use, or typos: say so rather than drop them silently
            warnings.warn(f"{type(self).__name__} ignores config keys {sorted(ignored)}", stacklevel=2)
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization '{parameterization}' is not supported: use eps or x0")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type '{loss_type}' is not supported: use l2 or l1")
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.monitor = monitor
        self.use_ema = use_ema  # restore the UNet's EMA copy from the checkpoint; in pretraining, also keep one
        self.original_elbo_weight = original_elbo_weight
        self.v_posterior = v_posterior
        self.l_simple_weight = l_simple_weight
        self.embedding_reg_weight = embedding_reg_weight
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        self.seed = seed
        self.batch_positions = BatchPositions()
        self.learning_rate = 1.0e-4
        # Read before the parts are built, so that they skip drawing the random weights it holds.
        checkpoint = ckpt_path if isinstance(ckpt_path, LoadedCheckpoint) or not ckpt_path else load_checkpoint(ckpt_path)
        self._pending_ckpt = (checkpoint, tuple(ignore_keys)) if checkpoint else None
        self.model = self.build_part("model", lambda: DiffusionWrapper(unet_config, conditioning_key))
        print(f"{type(self.model).__name__} has {count_params(self.model) * 1e-6:.2f} M params.")
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)

    def build_part(self, name: str, build):
        """`build()`, the part to be registered as `name`; weights the pending checkpoint sets are not drawn."""
        checkpoint, ignore_keys = self._pending_ckpt or (None, ())
        return build_filled_by(checkpoint, name, build, ignore_keys)

    def register_schedule(self, beta_schedule, timesteps, linear_start, linear_end, cosine_s):
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(timesteps)
        self.linear_start, self.linear_end = linear_start, linear_end

        def buffer(name, value, persistent=True):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=persistent)

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        buffer("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod))
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + self.v_posterior * betas
        buffer("posterior_variance", posterior_variance)
        buffer("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))
        with np.errstate(divide="ignore"):  # the posterior variance at t=0 is zero; that entry is replaced below
            if self.parameterization == "eps":
                lvlb = betas**2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
            else:
                lvlb = 0.5 * np.sqrt(alphas_cumprod) / (2.0 * (1 - alphas_cumprod))
        lvlb[0] = lvlb[1]
        buffer("lvlb_weights", lvlb, persistent=False)

    def q_sample(self, x_start, t, noise):
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def get_loss(self, pred, target):
        error = (target - pred).abs() if self.loss_type == "l1" else (target - pred) ** 2
        return error.float().mean(dim=[1, 2, 3])


class LatentDiffusion(DDPM):
    """DDPM on autoencoder latents, conditioned on text through the cond-stage encoder and learned pseudo-words.

    `ucg_training` (SD 2's name), e.g. `{caption: {p: 0.1, val: ""}}`, replaces a batch entry by `val` with
    probability `p` while training, so that the model also learns the unconditional prediction that classifier-free
    guidance needs.
    """

    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        personalization_config=None,
        num_timesteps_cond=None,
        cond_stage_key="image",
        cond_stage_trainable=False,
        concat_mode=True,
        cond_stage_forward=None,
        conditioning_key=None,
        scale_factor=1.0,
        scale_by_std=False,
        cache_latents=True,
        park_first_stage=True,
        park_token_table=True,
        frozen_weights_dtype="auto",
        compile_unet=False,
        cuda_graphs=False,
        offload_unet=False,
        channels_last=False,
        ucg_training=None,
        *args,
        **kwargs,
    ):
        if frozen_weights_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_weights_dtype '{frozen_weights_dtype}' is not one of {', '.join(FROZEN_DTYPES)}")
        if not isinstance(compile_unet, bool) and compile_unet not in COMPILE_MODES:
            raise ValueError(f"compile_unet '{compile_unet}' is not true, false or a torch.compile mode "
                             f"({', '.join(COMPILE_MODES)})")
        if offload_unet and compile_unet:
            raise ValueError("offload_unet and compile_unet cannot be combined (the compiled UNet would read weights "
                             "that move every step): set compile_unet: false")
        if offload_unet and kwargs.get("unfreeze_model"):
            raise ValueError("offload_unet streams frozen UNet weights from CPU memory, and unfreeze_model trains them "
                             "(their optimizer state and gradients live on the GPU): set offload_unet: false")
        if cuda_graphs and compile_unet:
            raise ValueError("cuda_graphs and compile_unet are alternatives: for CUDA graphs of the compiled UNet "
                             "set compile_unet: reduce-overhead and cuda_graphs: false")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cache_latents = cache_latents
        self.park_first_stage = park_first_stage
        self.park_token_table = park_token_table
        self.frozen_weights_dtype = frozen_weights_dtype
        self.compile_unet = compile_unet
        self.ucg_training = dict(ucg_training or {})
        # (training?, image_index, flipped) -> posterior parameters (mean and logvar) of the frozen VAE
        self._latent_cache = {}
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        if channels_last:
            self.model.use_channels_last()
        if offload_unet:
            self.model.offload_weights()
        if cuda_graphs:
            self.model.use_cuda_graphs(sampling=False)  # training passes; the generation scripts graph sampling
            if self.model.graphed_unet.checkpointing:
                warnings.warn("cuda_graphs does not apply with gradient checkpointing (use_checkpoint): the UNet "
                              "runs eagerly")
        first_stage = self.build_part("first_stage_model", lambda: instantiate_from_config(first_stage_config))
        self.first_stage_model = _freeze(first_stage)
        self.frozen_parts = ["first_stage_model"]  # kept in eval mode by `train`
        self.cond_stage_model = self.build_part("cond_stage_model", lambda: instantiate_from_config(cond_stage_config))
        if cuda_graphs and isinstance(self.cond_stage_model, TextConditioner):
            self.cond_stage_model.use_cuda_graphs()
        self.restored_from_checkpoint = self._pending_ckpt is not None
        if self._pending_ckpt:
            restore(self, self._pending_ckpt[0], ignore_keys=self._pending_ckpt[1], use_ema=self.use_ema)
            self._pending_ckpt = None  # the checkpoint's memory, and no copy of it in a pickled model
        self.pretraining = self.unfreeze_model and personalization_config is None
        if not self.unfreeze_model:
            self.frozen_parts.append("model")
            _freeze(self.model)
        if self.cond_stage_model is not None and (not self.unfreeze_model or self.pretraining and not cond_stage_trainable):
            self.frozen_parts.append("cond_stage_model")
            _freeze(self.cond_stage_model)
        self.model_ema = LitEma(self.model) if self.pretraining and self.use_ema else None
        self.embedding_manager = None
        if personalization_config is not None:
            self.embedding_manager = instantiate_from_config(personalization_config, embedder=self.cond_stage_model)
            for p in self.embedding_manager.embedding_parameters():
                p.requires_grad_(True)
        # Checkpoints of a textual-inversion run hold only the learned vectors (and optimizer state).
        self.strict_loading = False

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout) when Lightning switches the model to training."""
        super().train(mode)
        for name in self.frozen_parts:
            getattr(self, name).eval()
        return self

    # --- conditioning and first stage -------------------------------------------------------------
    def get_learned_conditioning(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.embedding_manager is not None:
            texts = [self.embedding_manager.prompt_for_tokenizer(text) for text in texts]
        return self.cond_stage_model.encode(texts, embedding_manager=self.embedding_manager)

    @contextmanager
    def first_stage_on_device(self):
        """The frozen VAE on the model's device for the duration, wherever it waits in between."""
        waiting_on = next(self.first_stage_model.parameters()).device
        if waiting_on == self.device:
            yield
            return
        self.first_stage_model.to(self.device)
        try:
            yield
        finally:
            self.first_stage_model.to(waiting_on)

    def park_idle_first_stage(self, batch):
        """Keep the frozen VAE in CPU memory while the training batches are ones the latent cache serves, where it
        idles after each image's first encoding (`park_first_stage`); it comes back for those encodings and for
        logged images. Its bf16 weights are 0.16 GiB of GPU memory for SD v1."""
        parkable = self.park_first_stage and self.latents_cacheable(batch) and self.device.type != "cpu"
        if parkable and next(self.first_stage_model.parameters()).device.type != "cpu":
            self.first_stage_model.cpu()

    def park_idle_weights(self, batch):
        """Frozen weights a training step does not read wait in CPU memory: the VAE (`park_idle_first_stage`) and
        the token table (`park_idle_token_table`)."""
        self.park_idle_first_stage(batch)
        self.park_idle_token_table()

    def park_idle_token_table(self):
        """On a GPU, keep a frozen text encoder's token table in CPU memory, each caption's rows looked up once
        (`park_token_table`: 72 MiB of bf16 for SD v1)."""
        conditioner = self.cond_stage_model
        parkable = (self.park_token_table and self.device.type != "cpu" and isinstance(conditioner, TextConditioner)
                    and not conditioner.token_embedding.weight.requires_grad)
        if parkable and not conditioner.token_table_parked:
            conditioner.park_token_table()

    @property
    def cached_latent_count(self) -> int:
        """How many (image, flip) posteriors the latent cache holds."""
        return len(self._latent_cache)

    def latents_cacheable(self, batch) -> bool:
        return self.cache_latents and "image_index" in batch and "flipped" in batch

    @torch.no_grad()
    def encode_first_stage(self, x):
        with self.first_stage_on_device():
            return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z):
        with self.first_stage_on_device():
            return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy, t, cond):
        if self.model.conditioning_key == "concat":
            return self.model(x_noisy, t, c_concat=[cond])
        if self.model.conditioning_key is None:
            return self.model(x_noisy, t)
        return self.model(x_noisy, t, c_crossattn=[cond])

    # --- training ---------------------------------------------------------------------------------
    def get_input(self, batch, key):
        return channels_first(batch[key])

    def training_generator(self):
        position = self.batch_positions.next(self.global_step, batches_per_step(self))
        return step_generator(self.seed, position, self.device, self.global_rank)

    def p_losses(self, x_start, cond, t, noise):
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start
        loss_simple = self.get_loss(model_output, target)
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = self.l_simple_weight * loss_simple.mean() + self.original_elbo_weight * loss_vlb
        logs = {"loss_simple": loss_simple.mean(), "loss_vlb": loss_vlb}
        if self.embedding_reg_weight > 0 and self.embedding_manager is not None:
            loss_emb_reg = self.embedding_manager.embedding_to_coarse_loss().mean()
            loss = loss + self.embedding_reg_weight * loss_emb_reg
            logs["loss_emb_reg"] = loss_emb_reg
        logs["loss"] = loss
        return loss, logs

    def posterior_of_batch(self, batch) -> DiagonalGaussianDistribution:
        """The VAE posterior of each training image, encoded once per (image, flip) when `cache_latents` is on.

        The VAE is frozen and the images are few, so the posterior of an image never changes: caching its mean
        and log-variance and sampling fresh noise each step draws exactly the latents per-step encoding would draw.
        Training and validation batches come from two datasets (in eval mode here: validation) whose image indices
        may name different images, so their latents are kept apart."""
        if not self.latents_cacheable(batch):
            return self.encode_first_stage(self.get_input(batch, self.first_stage_key).to(self.device))
        keys = [(self.training, index, flipped) for index, flipped in zip(batch["image_index"].tolist(),
                                                                          batch["flipped"].tolist())]
        missing = [i for i, key in enumerate(keys) if key not in self._latent_cache]
        if missing:
            pixels = batch[self.first_stage_key]
            with self.first_stage_on_device():
                for i in missing:
                    # One image at a time, so a cached latent never depends on which batch first met the image
                    # (a resumed run then reproduces an uninterrupted one bit for bit).
                    x = channels_first(pixels[i : i + 1].to(self.device))
                    self._latent_cache[keys[i]] = self.encode_first_stage(x).parameters[0]
        return DiagonalGaussianDistribution(torch.stack([self._latent_cache[key] for key in keys]))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Lightning's move of a batch to the GPU, leaving on the host what the latent cache reads there: the
        cache keys (reading them from the GPU would wait for its queued work at every step) and the pixels, which
        only images met for the first time need."""
        if not (isinstance(batch, dict) and self.latents_cacheable(batch)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        host_keys = {"image_index", "flipped", self.first_stage_key}
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in host_keys}, device,
                                                 dataloader_idx)
        return {**moved, **{k: v for k, v in batch.items() if k in host_keys}}

    def shared_step(self, batch, generator):
        posterior = self.posterior_of_batch(batch)
        z = self.get_first_stage_encoding(posterior, generator=generator).detach()
        cond = self.get_learned_conditioning(batch[self.cond_stage_key])
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device, generator=generator)
        noise = torch.randn(z.shape, device=self.device, generator=generator, dtype=z.dtype)
        return self.p_losses(z, cond, t, noise)

    def setup(self, stage):
        if self.model.weight_offload is not None and self.trainer.world_size > 1:
            raise ValueError("offload_unet works on one device: train on one GPU (--gpus 0,) or set offload_unet: "
                             "false")
        self.prepare_for_training(str(self.trainer.precision))

    def prepare_for_training(self, precision: str):
        """Store the frozen weights in the trainer's half precision (autocast runs in it anyway): half the memory
        and no per-step weight casts; the learned vectors stay float32. Compile the UNet if asked."""
        mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        dtype = FROZEN_DTYPES[self.frozen_weights_dtype] or mixed
        if dtype not in (None, torch.float32) and mixed is None:
            raise ValueError(f"frozen_weights_dtype: {self.frozen_weights_dtype} needs a mixed precision (half weights "
                             f"meet float32 inputs only under autocast): pass --precision bf16-mixed or 16-mixed, or set "
                             f"frozen_weights_dtype: auto")
        if self.model.weight_offload is not None and mixed not in (None, dtype):
            raise ValueError(f"offload_unet keeps the UNet's weights in CPU memory only if they are stored in the "
                             f"autocast dtype of --precision {precision}: with frozen_weights_dtype: "
                             f"{self.frozen_weights_dtype} autocast keeps a converted copy of each on the device "
                             f"for the backward; set frozen_weights_dtype: auto")
        if dtype is not None and not self.unfreeze_model:
            self.store_frozen_weights(dtype)
        if self.compile_unet:  # in place: weights and state-dict names stay those of the plain module
            self.model.diffusion_model.compile(mode=None if self.compile_unet is True else self.compile_unet)

    def store_frozen_weights(self, dtype: torch.dtype):
        """Keep the UNet, the autoencoder and the text encoder in `dtype`; the learned vectors stay as they are."""
        for module in (self.model, self.first_stage_model, self.cond_stage_model):
            module.to(dtype)

    def on_train_end(self):
        self.first_stage_model.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        if self.embedding_manager is not None:
            self.embedding_manager.set_training_step(self.global_step)
        self.park_idle_weights(batch)
        fresh_start = not self.trainer.ckpt_path and not self.restored_from_checkpoint
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and fresh_start:
            with torch.no_grad(), self.first_stage_on_device():
                x = self.get_input(batch, self.first_stage_key).to(self.device)
                z = self.encode_first_stage(x).sample()
            self.scale_factor = 1.0 / z.flatten().std()
            # Under DDP the ranks' first batches differ; DDP hands rank 0's buffer to all.
            self.print(f"Setting scale_factor to {self.scale_factor.item():.5f} (1 / std of the first batch's latents)")

    def drop_conditioning(self, batch, generator):
        """`ucg_training`: each item's entry under a configured key becomes `val` with probability `p`."""
        if not self.ucg_training:
            return batch
        batch = dict(batch)
        # Drawn on the host from the step's seed: reading draws made on the GPU would wait for its queued work.
        host_generator = torch.Generator().manual_seed(generator.initial_seed())
        for key, setting in self.ucg_training.items():
            values = list(batch[key])
            dropped = torch.rand(len(values), generator=host_generator) < float(setting["p"])
            batch[key] = [setting["val"] if drop else value for drop, value in zip(dropped.tolist(), values)]
        return batch

    def training_step(self, batch, batch_idx):
        generator = self.training_generator()
        loss, logs = self.shared_step(self.drop_conditioning(batch, generator), generator)
        # The progress bar shows the loss (ldm.callbacks.LossProgressBar); `on_train_batch_end` logs the rest.
        return {"loss": loss, "logs": {name: value.detach() for name, value in logs.items()}}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Log the step's metrics at the steps where Lightning writes them to the logger, by its own rule, which
        this hook is the first to see settled (it runs after the callbacks, which may stop the run). Lightning
        drops them at the other steps, and each `self.log` costs about a millisecond of CPU time (5 ms a step on
        a 2-core CPU), which at batch 1 can be a good part of a step."""
        if self.trainer.fit_loop.epoch_loop._should_accumulate() or not self.trainer._logger_connector.should_update_logs:
            return
        self.log_dict({f"train/{name}": value for name, value in outputs["logs"].items()}, on_step=True, on_epoch=False)
        if self.embedding_manager is not None:
            norms = {f"train/norm/{name}": n.detach().max() for name, n in self.embedding_manager.vector_norms().items()}
            self.log_dict(norms, on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs):
        """The norm cap and the EMA follow every optimizer step here, before any callback (checkpointing) sees
        the step end."""
        super().optimizer_step(*args, **kwargs)
        if self.embedding_manager is not None:
            self.embedding_manager.apply_norm_cap()
        if self.model_ema is not None:
            self.model_ema(self.model)

    def ema_scope(self):
        """A context with the EMA weights in the UNet, when the model keeps an EMA."""
        return self.model_ema.applied_to(self.model) if self.model_ema is not None else nullcontext()

    def validation_step(self, batch, batch_idx):
        # A fixed stream per validation batch makes val/loss comparable across the run.
        def log_losses(suffix):
            generator = step_generator(self.seed + 1, batch_idx, self.device, self.global_rank)
            _, logs = self.shared_step(batch, generator)
            self.log_dict({f"val/{k}{suffix}": v for k, v in logs.items()}, on_step=False, on_epoch=True, sync_dist=True)

        log_losses("")
        if self.model_ema is not None:
            with self.ema_scope():
                log_losses("_ema")

    def configure_optimizers(self):
        if self.pretraining:
            params = list(self.model.parameters())
            if self.cond_stage_trainable and self.cond_stage_model is not None:
                params += list(self.cond_stage_model.parameters())
            return self._remember_learning_rates(torch.optim.AdamW(params, lr=self.learning_rate))
        if self.embedding_manager is None:
            raise ValueError(
                "this config has no personalization_config: nothing to train (add the EmbeddingManager block for "
                "textual inversion, or set model.params.unfreeze_model: true to pretrain the model)"
            )
        groups = [{"params": list(self.embedding_manager.embedding_parameters()), "lr": self.learning_rate}]
        if self.unfreeze_model:
            model_params = list(self.model.parameters()) + list(self.cond_stage_model.parameters())
            groups.append({"params": model_params, "lr": self.model_lr})
        fused = fused_adamw([p for group in groups for p in group["params"]], self._trainer)
        return self._remember_learning_rates(torch.optim.AdamW(groups, lr=self.learning_rate, fused=fused))

    def _remember_learning_rates(self, optimizer):
        self._learning_rates = [group["lr"] for group in optimizer.param_groups]
        return optimizer

    def on_train_start(self):
        """A resumed run's optimizer state brings back the learning rates it was saved with; use the ones this
        command set (main.py prints them), which differ only where the command changed them."""
        for optimizer in self.trainer.optimizers:
            for group, learning_rate in zip(optimizer.param_groups, self._learning_rates):
                group["lr"] = learning_rate

    def on_load_checkpoint(self, checkpoint):
        """A resumed run must learn the words its checkpoint holds: with another placeholder or vector count (a
        changed --placeholder_string or num_vectors_per_token), the learned vectors would be dropped silently or
        fail to load with a shape error."""
        if self.embedding_manager is None:
            return
        prefix = "embedding_manager.string_to_param_dict."
        saved = {k[len(prefix):]: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        own = {k[len(prefix):]: tuple(v.shape) for k, v in self.state_dict().items() if k.startswith(prefix)}
        if saved != own:
            def describe(words):
                return ", ".join(f"'{word}' ({shape[0]} vector{'s' if shape[0] > 1 else ''})" for word, shape in words.items())

            raise ValueError(f"the checkpoint holds the learned words {describe(saved)}, but this run's config names "
                             f"{describe(own)}: resume with the run's own placeholder and vector count (drop "
                             "--placeholder_string and num_vectors_per_token overrides)")

    def on_save_checkpoint(self, checkpoint):
        """Keep only what training changed: the frozen model is already in the user's checkpoint. An unfrozen
        model (pretraining, or textual inversion with `unfreeze_model`) is saved whole."""
        if not self.unfreeze_model:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("embedding_manager.")}
            if self.scale_by_std:
                checkpoint["state_dict"]["scale_factor"] = self.scale_factor

    # --- images for the logger --------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch, N=8, sample=True, ddim_steps=50, ddim_eta=1.0, unconditional_guidance_scale=5.0, seed=0, **ignored):
        """Inputs, reconstructions, the captions as images, and samples without and with guidance (drawn with
        the EMA weights when the model keeps an EMA)."""
        with self.first_stage_on_device(), self.autocast_to_stored_weights():
            return self._log_images(batch, N, sample, ddim_steps, ddim_eta, unconditional_guidance_scale, seed)

    def autocast_to_stored_weights(self):
        """Autocast to the half dtype the frozen weights are stored in (none for float32): callbacks such as the image
        logger run outside the trainer's autocast, and float32 inputs cannot meet half weights without it."""
        dtype = next(self.model.parameters()).dtype
        if dtype == torch.float32 or not torch.amp.is_autocast_available(self.device.type):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _log_images(self, batch, N, sample, ddim_steps, ddim_eta, unconditional_guidance_scale, seed):
        from ldm.models.diffusion.ddim import DDIMSampler

        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device)
        texts = list(batch[self.cond_stage_key])[: x.shape[0]]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        z = self.get_first_stage_encoding(self.encode_first_stage(x), generator=generator)
        logs = {"inputs": x, "reconstruction": self.decode_first_stage(z)}
        logs["conditioning"] = log_txt_as_img((x.shape[3], x.shape[2]), texts).to(self.device)
        if sample:
            with self.ema_scope():
                cond = self.get_learned_conditioning(texts)
                sampler = DDIMSampler(self)
                shape = tuple(z.shape[1:])
                samples, _ = sampler.sample(ddim_steps, z.shape[0], shape, cond, eta=ddim_eta, generator=generator)
                logs["samples"] = self.decode_first_stage(samples)
                if unconditional_guidance_scale != 1.0:
                    uc = self.get_learned_conditioning(len(texts) * [""])
                    samples, _ = sampler.sample(
                        ddim_steps, z.shape[0], shape, cond, eta=ddim_eta, generator=generator,
                        unconditional_guidance_scale=unconditional_guidance_scale, unconditional_conditioning=uc,
                    )
                    logs["samples_scaled"] = self.decode_first_stage(samples)
        return logs
