"""Serves a prior in the browser (clipgen_jax/app.py): a prompt or an uploaded image in, CLIP-re-ranked images out.

  pip install -e '.[app]'     (Gradio, pinned)
  python tools/serve.py [--prior shapes] [--host 127.0.0.1 --port 7860]
      [--max_candidates 64 --max_prompt_chars 300 --queue_size 16]

--prior takes anything `Pipeline.load` does (default: the packaged Shapes prior). The model loads and compiles (a
warm-up request) before the server prints "ready". It listens on 127.0.0.1 only; `--host 0.0.0.0` serves every
network interface, an explicit choice (there is no authentication). One request runs at a time, --queue_size more
wait, and a request beyond that gets "Queue is full! Please try again.".
"""

from absl import app, flags

from clipgen_jax import app as app_lib
from clipgen_jax import cli, host_memory, pipeline
from clipgen_jax.training import writer

_PRIOR = flags.DEFINE_string("prior", "shapes", "Prior training workdir, exported bundle or packaged name.")
_VQGAN = flags.DEFINE_string("vqgan", None, "VQGAN workdir or bundle (default: the prior's).")
_CLIP = flags.DEFINE_string("clip", None, "CLIP Hub id, directory or packaged name (default: the prior's).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on; 0.0.0.0 serves every network interface.")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", app_lib.Limits.max_candidates,
                                       "Most candidates one request may draw.")
_MAX_PROMPT_CHARS = flags.DEFINE_integer("max_prompt_chars", app_lib.Limits.max_prompt_chars,
                                         "Longest prompt, in characters (the CLIP's context limits it too).")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", app_lib.Limits.queue_size,
                                   "Requests that may wait while one runs; more are told to try again.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    host_memory.keep_freed_memory()
    try:
        limits = app_lib.Limits(max_candidates=_MAX_CANDIDATES.value, max_prompt_chars=_MAX_PROMPT_CHARS.value,
                                queue_size=_QUEUE_SIZE.value)
        if min(limits.max_candidates, limits.max_prompt_chars, limits.queue_size) < 1:
            raise ValueError("--max_candidates, --max_prompt_chars and --queue_size must be at least 1")
        pipe = pipeline.Pipeline.load(_PRIOR.value, vqgan=_VQGAN.value, clip=_CLIP.value)
        service = app_lib.Service(pipe, limits)
        print("compiling (warm-up request)...", flush=True)
        service.warm_up()
    except (OSError, ValueError) as error:  # a missing prior, mismatched models, bad limits: the message says why
        cli.fail(str(error))
    demo = app_lib.build(service, app_lib.default_examples(pipe.metadata))
    url = app_lib.launch(demo, _HOST.value, _PORT.value)
    print(f"ready: {url}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
