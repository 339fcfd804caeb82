from setuptools import find_packages, setup

setup(
    name="textual-inversion",
    version="0.1.0",
    description="Textual Inversion for Latent Diffusion and Stable Diffusion v1, offline and lean",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm": ["modules/encoders/vocab/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.7",
        "torchvision",
        "numpy",
        "omegaconf>=2.3",
        "pytorch-lightning>=2.2",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "einops",
        "pillow",
        "ftfy",
        "regex",
        "tqdm",
        "tensorboard",
        "open_clip_torch>=2.20",
        "taming-transformers-rom1504==0.0.6",
    ],
    extras_require={"test": ["pytest", "diffusers>=0.30"]},
)
