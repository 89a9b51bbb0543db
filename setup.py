"""clipgen_jax: CLIP-GEN (language-free text-to-image training with CLIP) in JAX/Flax."""

import setuptools

# Loose ranges for installing into an environment of your own; constraints/cpu.txt records one set of versions
# verified together (what `make install` uses). transformers 5.x removed every Flax model, hence the upper pin;
# its `[flax]` extra pins jax 0.4 and must not be used. TensorFlow is never required (array_record + grain).
INSTALL_REQUIRES = [
    "jax>=0.8.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.20",
    "ml_collections>=1.0.0",
    "tensorflow-datasets>=4.9.9",
    "array_record>=0.8.1",
    "grain>=0.2.12",
    "transformers>=4.57.6,<5",
    "safetensors>=0.4",  # CLIP weights in PyTorch naming, read without torch
    "numpy>=1.26",
    "Pillow>=10.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",  # the demo's training-curve plots
    "tensorboardX>=2.6.2",
    "absl-py>=2.1",
    "PyYAML>=6.0",  # taming configs (yaml.safe_load only)
    "ml_dtypes>=0.4",
    # tensorflow-datasets needs it for builders defined outside its tree but declares it only for Python < 3.9.
    "importlib_resources>=6.0",
]

EXTRAS_REQUIRE = {
    # skimage: reference SSIM and sample photographs; nbclient, nbformat, ipykernel: executing notebooks/ in CI.
    "test": ["pytest>=8.0", "scikit-image>=0.22", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
             "selenium>=4.20"],  # selenium: the web app's browser tests (with Debian's chromium-driver)
    # The web app (tools/serve.py). gradio 6.17.3 is the newest whose huggingface-hub range (<2) admits
    # transformers<5's (<1.0); it also needs pillow<13. constraints/app.txt pins the rest of its dependencies.
    "app": ["gradio==6.17.3", "gradio_client==2.5.0"],
    # Reading tfrecord-format TFDS datasets (tfds.load) needs TensorFlow; array_record datasets do not.
    "tf": ["tensorflow>=2.16"],
    # The taming-transformers parity test. torch 2.13.0 is a CPU build on the project's machines; add
    # `pip install --no-deps taming-transformers-rom1504==0.0.6` (its declared deps would pull another torch).
    "parity": ["torch==2.13.0", "einops>=0.8"],
    "cuda": ["jax[cuda12]>=0.8.0"],
    "tpu": ["jax[tpu]>=0.8.0"],
}

setuptools.setup(
    name="clipgen_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",  # jax >= 0.8 and flax >= 0.12 need it
    packages=setuptools.find_packages(include=["clipgen_jax", "clipgen_jax.*"]),
    # OpenAI's CLIP BPE vocabulary, the shipped Shapes CLIPs, VQGAN and prior (see clipgen_jax/assets/).
    package_data={"clipgen_jax": ["assets/clip_bpe/*", "assets/clip/*", "assets/clip/*/*", "assets/shapes/**/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
