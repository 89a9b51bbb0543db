"""The web app of tools/serve.py: a Gradio page over one `Pipeline`.

A prompt (or an uploaded image, for variations) and `tools/generate.py`'s sampling controls go in; the kept images come
out in CLIP-score order with their scores, a download of their grid, the settings and the `tools/generate.py` command
that reproduces them. One request runs at a time (the model has the machine to itself); `Limits.queue_size` more may
wait, and beyond that Gradio answers "Queue is full! Please try again.".

Offline by construction: Gradio's analytics and version check are off, the theme uses the system's fonts (Gradio's
default loads web fonts), and nothing else the page loads comes from another host (tests/test_serve.py reads the
page for other hosts; tests/test_serve_browser.py checks what a real browser loads).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no telemetry, no update check

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipgen_jax import pipeline  # noqa: E402
from clipgen_jax.data import shapes  # noqa: E402
from clipgen_jax.models import clip as clip_lib  # noqa: E402
from clipgen_jax.training import writer  # noqa: E402

# tools/generate.py's defaults, which the controls start at (top_k 0 and top_p 1 filter nothing: its None).
DEFAULTS = dict(num_candidates=16, keep=1, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, seed=0)
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
CONCURRENCY_ID = "model"  # text and image requests share the one model: one request at a time across both


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many requests may wait."""

    max_candidates: int = 64
    max_prompt_chars: int = 300
    queue_size: int = 16


def shapes_examples(count: int = 8) -> list[str]:
    """Canonical captions of held-out Shapes combinations (never seen in training), spread over the 96."""
    combinations = shapes.heldout_combinations()
    return [shapes.canonical_caption(combinations[i * len(combinations) // count]) for i in range(count)]


def default_examples(metadata: dict) -> list[str]:
    """Example prompts for a prior: the held-out Shapes captions when it is conditioned on a packaged Shapes CLIP."""
    return shapes_examples() if metadata.get("clip") in clip_lib.PACKAGED else []


class Service:
    """Requests -> checked settings -> `Pipeline.generate_one` -> what the page shows. Every problem with a request
    is a ValueError whose message says what to change."""

    def __init__(self, pipe: pipeline.Pipeline, limits: Limits = Limits()):
        self.pipe, self.limits = pipe, limits
        self.out_dir = pathlib.Path(tempfile.mkdtemp(prefix="clipgen_serve_"))

    def settings(self, num_candidates, keep, temperature, top_k, top_p, guidance_scale, seed) -> dict:
        """The controls' values (an API caller can send anything) checked against the limits and the prior, as
        `Pipeline.generate_one`'s keyword arguments."""
        values = dict(num_candidates=num_candidates, keep=keep, temperature=temperature, top_k=top_k, top_p=top_p,
                      guidance_scale=guidance_scale, seed=seed)
        for name, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("num_candidates", "keep", "top_k", "seed"):
            if values[name] != int(values[name]):
                raise ValueError(f"{name} must be a whole number, got {values[name]}")
            values[name] = int(values[name])
        if not 1 <= values["num_candidates"] <= self.limits.max_candidates:
            raise ValueError(f"candidates must be between 1 and {self.limits.max_candidates} on this server, got "
                             f"{values['num_candidates']}")
        if not 0 <= values["seed"] < 2 ** 31:
            raise ValueError(f"seed must be between 0 and 2^31 - 1, got {values['seed']}")
        if values["top_k"] < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {values['top_k']}")
        values.update(top_k=values["top_k"] or None, top_p=None if values["top_p"] >= 1.0 else float(values["top_p"]),
                      temperature=float(values["temperature"]), guidance_scale=float(values["guidance_scale"]))
        pipeline.check_candidates(values["num_candidates"], values["keep"], 1)
        pipeline.check_sampling_settings(values["temperature"], values["top_k"], values["top_p"],
                                         values["guidance_scale"], self.pipe.prior.vocab_size)
        pipeline.check_guidance(values["guidance_scale"], self.pipe.metadata.get("cond", {}))
        return values

    def check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: type one, or click an example")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ValueError(f"the prompt has {len(prompt)} characters; this server takes at most "
                             f"{self.limits.max_prompt_chars}")
        return self.pipe.check_prompts([prompt])[0]

    def image_embedding(self, image_path) -> np.ndarray:
        """An uploaded image file -> its CLIP embedding [D], read as tools/generate.py reads --image."""
        if not image_path:
            raise ValueError("no image uploaded: drop one on the image box")
        try:
            with Image.open(image_path) as image:
                pixels = pipeline.image_pixels(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot read the uploaded image ({error}); upload a PNG or JPEG") from None
        return self.pipe.clip.embed_images(pixels[None])[0]

    def generate(self, prompt: str | None, image_path: str | None, controls: Sequence,
                 progress: Callable[[int, int], None] | None = None) -> tuple[pipeline.Generation, dict]:
        """One request: a prompt, or (prompt None) the image at `image_path`, and the controls' values; returns the
        generation and the settings it used."""
        settings = self.settings(*controls)
        if prompt is not None:
            return self.pipe.generate_one(self.check_prompt(prompt), progress=progress, **settings), settings
        return self.pipe.generate_one(image_embedding=self.image_embedding(image_path), image_path="YOUR_IMAGE.png",
                                      progress=progress, **settings), settings

    def respond(self, prompt: str | None, image_path: str | None, controls: Sequence,
                progress: Callable[[int, int], None] | None = None) -> tuple:
        """`generate`, as the page shows it: gallery items (image, caption), the grid file, the prompt, settings and
        scores, and the command."""
        generation, settings = self.generate(prompt, image_path, controls, progress)
        images, scores = generation.images_KHWC, generation.scores_K
        grid_file = tempfile.NamedTemporaryFile(suffix=".png", prefix="grid_", dir=self.out_dir, delete=False)
        with grid_file:
            Image.fromarray(writer.image_grid(images, columns=len(images))).save(grid_file, format="png")
        gallery = [(image, f"#{rank + 1}: {score:.4f}")
                   for rank, (image, score) in enumerate(zip(images, scores))]
        record = {"prompt": prompt, **settings, "clip_scores": [round(float(s), 6) for s in scores]}
        return gallery, grid_file.name, record, generation.command

    def warm_up(self) -> None:
        """Compiles before the server says it is ready: the text and image paths, the sampler without and with top-k
        and top-p filtering (their values are traced: any later value reuses these)."""
        defaults = {**DEFAULTS, "num_candidates": min(DEFAULTS["num_candidates"], self.limits.max_candidates)}
        self.generate(shapes.canonical_caption(shapes.heldout_combinations()[0]), None, list(defaults.values()))
        blank = self.out_dir / "warm_up.png"
        Image.new("RGB", (self.pipe.image_size, self.pipe.image_size)).save(blank)
        filtered = {**defaults, "top_k": self.pipe.prior.vocab_size, "top_p": 0.9}
        self.generate(None, str(blank), list(filtered.values()))


def _handler(service: Service, with_image: bool):
    def handle(source, num_candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
               progress=gr.Progress()):
        controls = (num_candidates, keep, temperature, top_k, top_p, guidance_scale, seed)

        def report(done: int, total: int) -> None:
            progress((done, total), desc="sampling, decoding and scoring candidates", unit="candidates")

        try:
            progress((0, 1), desc="sampling, decoding and scoring candidates")
            return service.respond(None if with_image else source, source if with_image else None, controls, report)
        except (OSError, ValueError) as error:  # the request's fault: say what to change; the server goes on
            raise gr.Error(str(error), print_exception=False) from None

    return handle


def build(service: Service, examples: Sequence[str] = ()) -> gr.Blocks:
    """The page: prompt and image tabs over shared controls, and the outputs."""
    pipe, limits = service.pipe, service.limits
    with gr.Blocks(title="CLIP-GEN", analytics_enabled=False) as demo:
        gr.Markdown(f"## CLIP-GEN text-to-image\nPrior `{pipe.source.get('prior')}`: {pipe.image_size} px images, "
                    f"{pipe.prior.num_tokens} tokens each, re-ranked by the CLIP `{pipe.clip.name}`.")
        with gr.Row():
            with gr.Column():
                with gr.Tab("Prompt"):
                    prompt = gr.Textbox(label="Prompt", max_length=limits.max_prompt_chars, elem_id="prompt",
                                        placeholder=examples[0] if examples else "describe an image")
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=[prompt], label="Held-out prompts")
                    text_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Tab("Image variations"):
                    # A file, not gr.Image: this code reads it, so an unreadable one gets a one-line message.
                    image = gr.File(label="Image (PNG, JPEG, ...)", file_types=["image"], type="filepath",
                                    elem_id="image")
                    image_button = gr.Button("Generate variations", variant="primary", elem_id="generate_variations")
                with gr.Accordion("Settings (tools/generate.py's defaults)", open=True):
                    controls = [
                        gr.Slider(1, limits.max_candidates, value=DEFAULTS["num_candidates"], step=1,
                                  label="Candidates", elem_id="num_candidates", info="images drawn before CLIP re-ranking"),
                        gr.Slider(1, limits.max_candidates, value=DEFAULTS["keep"], step=1, label="Images kept", elem_id="keep"),
                        gr.Slider(0.0, 2.0, value=DEFAULTS["temperature"], step=0.05, label="Temperature",
                                  info="0 takes the most likely token"),
                        gr.Slider(0, pipe.prior.vocab_size, value=DEFAULTS["top_k"], step=1, label="Top-k",
                                  info="0 = off"),
                        gr.Slider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.05, label="Top-p", info="1 = off"),
                        gr.Slider(0.0, 8.0, value=DEFAULTS["guidance_scale"], step=0.25, label="Guidance scale",
                                  interactive=pipe.null_embedding_trained,
                                  info="1 = none" if pipe.null_embedding_trained else
                                  "off: this prior was trained without condition dropout (no trained null embedding)"),
                        gr.Number(value=DEFAULTS["seed"], precision=0, minimum=0, label="Seed", elem_id="seed"),
                    ]
            with gr.Column():
                gallery = gr.Gallery(label="Kept images, best first (#rank: CLIP score)", columns=4, format="png",
                                     elem_id="gallery", height=320)
                grid = gr.File(label="Grid (PNG)", elem_id="grid")
                command = gr.Textbox(label="Reproduce with", elem_id="command", lines=2)
                record = gr.JSON(label="Seed, settings and scores")
        outputs = [gallery, grid, record, command]
        for triggers, source, with_image, api_name in (([text_button.click, prompt.submit], prompt, False, "generate"),
                                                       ([image_button.click], image, True, "variations")):
            gr.on(triggers, _handler(service, with_image), inputs=[source, *controls], outputs=outputs,
                  api_name=api_name, concurrency_id=CONCURRENCY_ID, concurrency_limit=1, show_progress="full")
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860) -> str:
    """Starts the server in a background thread (on loopback unless another host is asked for; port None: the first
    free one from 7860); returns its URL. `demo.block_thread()` then serves until interrupted, `demo.close()` stops
    it."""
    demo.launch(server_name=host, server_port=port, share=False, show_error=True, theme=THEME, quiet=True,
                prevent_thread_lock=True, inbrowser=False)
    return demo.local_url
