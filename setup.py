"""fic: run language models far larger than the memory you give them."""
from setuptools import find_packages, setup

SERVE = ["uvicorn>=0.30", "starlette>=0.40"]
PLOT = ["matplotlib>=3.5"]  # `fic bench --sweep --plot FILE.png`

setup(
    name="flashinfer-cli",
    version="0.1.0",
    description="Run language models far larger than memory: experts streamed from flash, int4 and 1-bit weights",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flashinfer_cli", "flashinfer_cli.*"]) + ["flashinfer_cli.models"],
    # the catalog lives at the top (models/) and installs as flashinfer_cli.models
    package_dir={"flashinfer_cli.models": "models"},
    package_data={
        "flashinfer_cli.models": ["*.toml"],
        # the texts fic ships (flashinfer_cli/texts.py)
        "flashinfer_cli": ["data/quality/*.txt", "data/prompts.json", "data/bench_prompts.json", "serve_page.html"],
    },
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    install_requires=[
        "cffi>=1.15",
        "numpy>=1.24",
        "click>=8.1",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "gguf==0.19.0",        # GGUF import: metadata, tensors, K-quant dequantization
        "tokenizers>=0.19",
        "jinja2>=3.1.6",       # chat templates, as transformers renders them
        'tomli>=1.1; python_version < "3.11"',
    ],
    extras_require={
        "hub": ["huggingface_hub>=0.23"],
        # `fic serve`: the OpenAI-compatible server (serve.py)
        "serve": SERVE,
        # `fic bench --sweep --plot FILE.png`
        "plot": PLOT,
        # The references the tests check fic against. torch is pinned so pip never pulls a CUDA build.
        # The server's tests drive it with the official openai client and its page with selenium
        # (and the chromium that .ci/browser installs).
        "test": SERVE + PLOT + [  # PLOT: the plot test draws a real PNG
            "openai>=1.40",
            "selenium>=4.11",
            "httpx>=0.27",
            "pytest>=7",
            "hypothesis>=6.100",  # tests/test_fuzz.py: every reader of a file fic did not write, fuzzed
            "torch==2.13.0",
            "transformers==5.24.0",
            "accelerate==1.15.0",
            "huggingface_hub>=0.23",
        ],
        # llama.cpp, the peer the tests also compare with: compiled from source (about 10 minutes,
        # needs cmake and g++); without it those tests skip and say so, CI installs it.
        "llamacpp": ["llama-cpp-python==0.3.36"],
    },
    entry_points={"console_scripts": ["fic=flashinfer_cli.__main__:console"]},
    zip_safe=False,
)
