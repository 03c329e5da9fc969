"""Text-to-image sampling, timed in three phases on both sides: text encoding, the denoising loop (30 DDIM steps with
classifier-free guidance: one batch-2B UNet call per step, ε = ε_u + s·(ε_c − ε_u), Ho & Salimans 2022, Eq. 6) and
the VAE decode.

minisd: a direct loop over minisd's DDIM sampler, the loop of minisd/pipeline.py without tokenizers and PIL.
diffusers: StableDiffusionPipeline / StableDiffusionXLPipeline built from the random-weight components (no safety
checker, no watermark, DDIMScheduler from the official scheduler config), called with precomputed prompt
embeddings and output_type="latent", so its call is the denoising loop alone; the decode is timed separately.
Text states are computed the same way for both: one batched call of the encoder(s) on [negative ids, prompt ids].

Dtypes (both): UNet and text encoders bf16 weights (no autocast needed), VAE fp32 (minisd's force_upcast default;
the SDXL VAE overflows in fp16), or bf16 with --decode-dtype bfloat16 (sample.py --vae-dtype bf16: fp32's exponent
range, no overflow; the decode on the tensor cores).

"UNet it/s" = steps / loop time: the UNet, the guidance arithmetic and the sampler step together, as users see it.

Shapes: B = images, h = latent side, T = 77 tokens, D = text width, P = pooled width.
"""
from __future__ import annotations

import torch

from bench.harness import Options, Workload, count_flops, median, timed
from bench.models import (TINY_RESOLUTION, TINY_STEPS, diffusers_parts, minisd_parts, model_config,
                          reference_configs, token_ids)
from bench.training import compile_unet


class SampleRun:
    """Times text encoding, the loop and the decode of each iteration; `metrics()` gives the medians."""

    def __init__(self, case, impl: str, tiny: bool, device: torch.device, opts: Options):
        if case.family not in ("sd15", "sdxl"):
            raise ValueError(f"sampling is benchmarked for sd15 and sdxl, not {case.family}")
        self.case, self.impl, self.tiny, self.device, self.opts = case, impl, tiny, device, opts
        self.cfg = model_config(case.family, tiny)
        self.B = case.batch
        self.R = TINY_RESOLUTION if tiny else case.resolution
        self.steps = TINY_STEPS if tiny else case.steps
        self.f = 2 ** (len(self.cfg.vae.ch_mult) - 1)
        build = minisd_parts if impl == "minisd" else diffusers_parts
        self.parts = build(case.family, tiny, device, torch.bfloat16)
        for m in [self.parts.unet, self.parts.vae, *self.parts.text_encoders]:
            m.requires_grad_(False).eval()
        self.decode_dtype = getattr(torch, opts.decode_dtype)
        self.parts.vae.to(self.decode_dtype)
        if opts.channels_last:
            self.parts.unet.to(memory_format=torch.channels_last)
            self.parts.vae.to(memory_format=torch.channels_last)
        self.unet = compile_unet(self.parts.unet, impl, opts.compile, opts.compile_mode) if opts.compile \
            else self.parts.unet
        ids = token_ids(case.family, tiny, self.B, device, seed=0)
        negative = token_ids(case.family, tiny, self.B, device, seed=1)
        self.ids = torch.cat([negative, ids])                                    # (2B, T): [uncond, cond]
        self.times = {"text_ms": [], "loop_ms": [], "decode_ms": []}
        self.setup()

    @torch.no_grad()
    def step(self):
        cond, text_ms = timed(self.encode, self.device)
        latents, loop_ms = timed(lambda: self.loop(cond), self.device)
        _, decode_ms = timed(lambda: self.decode(latents), self.device)
        for k, v in (("text_ms", text_ms), ("loop_ms", loop_ms), ("decode_ms", decode_ms)):
            self.times[k].append(v)

    def metrics(self) -> dict:
        m = {k: median(v) for k, v in self.times.items()}
        m["unet_step_ms"] = m["loop_ms"] / self.steps
        m["unet_it_s"] = 1e3 / m["unet_step_ms"]
        return m

    @torch.no_grad()
    def flops(self) -> float:
        cond = self.encode()
        latents = torch.randn(self.B, 4, self.R // self.f, self.R // self.f, device=self.device)
        text = count_flops(self.encode)
        unet = count_flops(lambda: self.unet_once(latents, cond))
        decode = count_flops(lambda: self.decode(latents))
        return text + self.steps * unet + decode

    def workload(self) -> Workload:
        info = {**self.parts.info(), "batch": self.B, "resolution": self.R, "steps": self.steps,
                "cfg_scale": self.case.cfg_scale,
                "dtypes": {"unet": "bfloat16", "text": "bfloat16", "vae": self.opts.decode_dtype}}
        return Workload(step=self.step, images=self.B, count_flops=self.flops, metrics=self.metrics, info=info,
                        start_timing=self.clear_times)

    def clear_times(self):
        for v in self.times.values():
            v.clear()

    def latent_noise(self) -> torch.Tensor:
        h = self.R // self.f
        return torch.randn(self.B, self.cfg.unet.in_channels, h, h, device=self.device)   # (B, 4, h, h)


class MinisdSample(SampleRun):
    def setup(self):
        from minisd.samplers import make_sampler
        self.sampler = make_sampler("ddim", self.cfg.schedule, self.steps)
        if self.opts.cuda_graph and self.device.type == "cuda":
            # the product's graphed UNet call (sample.py --cuda-graph): the first call eager, the second records
            from minisd.perf.graphs import UNetGraphs
            self.unet = UNetGraphs(self.unet)

    def encode(self):
        from minisd.unet import sdxl_vector_cond
        hidden, pooled = [], None
        for te in self.parts.text_encoders:
            h, p = te(self.ids)
            hidden.append(h)
            pooled = p
        ctx, y = torch.cat(hidden, dim=-1), None                                 # (2B, T, D)
        if self.cfg.unet.adm_in_channels:
            time_ids = torch.tensor([[self.R, self.R, 0, 0, self.R, self.R]], dtype=torch.float32,
                                    device=self.device).repeat(len(ctx), 1)      # (2B, 6)
            y = sdxl_vector_cond(pooled, time_ids, embed_dim=self.cfg.unet.addition_time_embed_dim)
        return ctx, y

    def model_input(self, x):
        fmt = torch.channels_last if self.opts.channels_last else torch.contiguous_format
        return torch.cat([x, x]).to(torch.bfloat16).contiguous(memory_format=fmt)   # (2B, 4, h, h)

    def loop(self, cond):
        ctx, y = cond
        s = self.case.cfg_scale
        x = self.latent_noise()
        for i, t in enumerate(self.sampler.timesteps):
            # fp32 timesteps: in bf16, t = 999 would round to 1000
            tt = torch.full((2 * self.B,), float(t), device=self.device)
            eps = self.unet(self.model_input(x), tt, ctx, y=y).float()
            eps_u, eps_c = eps.chunk(2)
            x = self.sampler.step(eps_u + s * (eps_c - eps_u), i, x)
        return x

    def unet_once(self, x, cond):
        ctx, y = cond
        tt = torch.full((2 * self.B,), 999.0, device=self.device)
        return self.parts.unet(self.model_input(x), tt, ctx, y=y)

    def decode(self, latents):
        return self.parts.vae.decode((latents.float() / self.cfg.vae.scale_factor).to(self.decode_dtype))  # (B,3,R,R)


class DiffusersSample(SampleRun):
    def setup(self):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        p = self.parts
        scheduler = DDIMScheduler.from_config(reference_configs(self.case.family, self.tiny)["scheduler"])
        if self.case.family == "sdxl":
            self.pipe = StableDiffusionXLPipeline(vae=p.vae, text_encoder=p.text_encoders[0],
                                                  text_encoder_2=p.text_encoders[1], tokenizer=None,
                                                  tokenizer_2=None, unet=p.unet, scheduler=scheduler,
                                                  force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            self.pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoders[0], tokenizer=None,
                                                unet=p.unet, scheduler=scheduler, safety_checker=None,
                                                feature_extractor=None, requires_safety_checker=False)
        if self.unet is not p.unet:
            self.pipe.unet = self.unet          # torch.compile'd as a whole, as diffusers' docs do it
        self.pipe.set_progress_bar_config(disable=True)

    def encode(self):
        tes = self.parts.text_encoders
        if self.case.family != "sdxl":
            return {"ctx": tes[0](self.ids, return_dict=False)[0], "pooled": None}
        hidden, pooled = [], None
        for te in tes:                          # penultimate states of both; pooled (projected) of the second
            out = te(self.ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]
            hidden.append(out[-1][-2])
        return {"ctx": torch.cat(hidden, dim=-1), "pooled": pooled}

    def loop(self, cond):
        neg, pos = cond["ctx"].chunk(2)
        kw = {}
        if cond["pooled"] is not None:
            neg_pooled, pooled = cond["pooled"].chunk(2)
            kw = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
        return self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=self.steps,
                         guidance_scale=self.case.cfg_scale, height=self.R, width=self.R, output_type="latent",
                         latents=self.latent_noise().to(torch.bfloat16), **kw).images

    def unet_once(self, x, cond):
        kw = {}
        if cond["pooled"] is not None:
            time_ids = torch.tensor([[self.R, self.R, 0, 0, self.R, self.R]], dtype=torch.bfloat16,
                                    device=self.device).repeat(2 * self.B, 1)
            kw["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        tt = torch.full((2 * self.B,), 999.0, device=self.device)
        x2 = torch.cat([x, x]).to(torch.bfloat16)
        return self.parts.unet(x2, tt, encoder_hidden_states=cond["ctx"], return_dict=False, **kw)[0]

    def decode(self, latents):
        vae = self.parts.vae
        return vae.decode((latents.float() / vae.config.scaling_factor).to(self.decode_dtype), return_dict=False)[0]


def build(case, impl: str, tiny: bool, device: torch.device, opts: Options) -> Workload:
    cls = MinisdSample if impl == "minisd" else DiffusersSample
    return cls(case, impl, tiny, device, opts).workload()
