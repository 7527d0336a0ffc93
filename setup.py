from setuptools import find_packages, setup

setup(
    name="tunelab",
    version="0.1.0",
    description="Fine-tuning, taught by building every piece by hand in PyTorch.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=["License :: OSI Approved :: MIT License", "Programming Language :: Python :: 3"],
    python_requires=">=3.10",
    packages=find_packages(include=["tunelab", "tunelab.*"]),
    install_requires=[
        "torch>=2.3",
        "numpy",
        "tqdm",
        "datasets>=2.14",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        # transformers 5.24 took `past_key_values` out of BertModel.forward, and peft (0.21.2) then refuses
        # prefix tuning on BERT ("Model does not support past key values"): the prefix parity tests need <5.24.
        "test": ["pytest", "pytest-xdist>=3.2", "transformers>=4.40,<5.24", "peft>=0.10",
                 # the NF4/FP4 parity tests: bitsandbytes quantizes 4-bit on the CPU since 0.45
                 "bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["tunelab = tunelab.cli:main"]},
)
