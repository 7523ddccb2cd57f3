"""ldct_tf: unpaired low-dose CT denoising on TensorFlow 2 / Keras 3 (CycleGAN, attention U-Net), with an Apache Beam
DICOM -> TFRecord pipeline.

The pins are the set verified together on the project's machines (see ../shared/STACK.md at the time of writing).
tensorflow-addons and tensorflow-io are deliberately absent: neither works with TF 2.21 / Keras 3 (docs/dependencies.md).
"""

from setuptools import find_packages, setup

CORE = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "keras-tuner==1.4.8",
    "tensorboard==2.21.0",  # keras-tuner fails every trial silently without it
    "scikit-learn==1.9.1",  # keras-tuner's BayesianOptimization (python -m ldct_tf.tune --tuner bayesian)
    "apache-beam[tfrecord]==2.77.0",
    "google-crc32c==1.9.0",
    "pydicom==3.0.2",
    "pynetdicom==3.0.4",  # the DICOM node (python -m ldct_tf.node): Storage SCP/SCU, Verification
    "pylibjpeg==2.1.0",  # + plugins: JPEG, JPEG-LS, JPEG 2000 and RLE decoding for pydicom
    "pylibjpeg-libjpeg==2.5.0",
    "pylibjpeg-openjpeg==2.6.0",
    "numpy==2.4.6",
    "protobuf==6.33.6",
    "tensorflow-serving-api==2.21.0",
    "scikit-image==0.26.0",
    "scipy==1.17.1",
    "PyYAML>=6.0,<7",
    "tqdm>=4.66,<5",
    "matplotlib==3.10.8",  # evaluation figures (PNG panels, metric bars, NPS curves)
]

EXTRAS = {
    # Dataflow runner and GCS access for the pipeline; also what a Dataflow worker installs via --setup_file.
    "dataflow": ["apache-beam[gcp,tfrecord]==2.77.0"],
    # Beam's DaskRunner on a dask.distributed cluster: the pipeline's second real engine (apache-beam[dask] wants
    # dask and distributed >= 2024.4.2; these are the versions tested together with Beam 2.77.0).
    "dask": ["dask==2026.8.0", "distributed==2026.8.0"],
    # BM3D is free for non-commercial use only: an opt-in evaluation baseline, never a core dependency.
    "baselines": ["bm3d==4.0.3"],
    # Real CT slices (head, enhanced abdomen) that the demo turns into a simulated low-dose series. MIT licensed.
    "demo": ["pydicom-data==1.0.0"],
    # Runs notebooks/quickstart.ipynb headless (the tests execute it).
    "notebook": ["nbclient==0.10.2", "nbformat==5.10.4", "ipykernel==6.29.5"],
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "nbclient==0.10.2", "nbformat==5.10.4", "ipykernel==6.29.5"],
}

setup(
    name="ldct_tf",
    version="0.1.0",
    description="Unpaired low-dose CT denoising (CycleGAN, attention U-Net) on TensorFlow 2 / Keras 3, "
    "with a Beam DICOM -> TFRecord pipeline",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["ldct_tf", "ldct_tf.*", "ldct_tf.pipeline", "ldct_tf.pipeline.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "ldct-pipeline=ldct_tf.pipeline.__main__:main",
            "ldct-simulate=ldct_tf.simulate.__main__:main",
            "ldct-train=ldct_tf.train.__main__:main",
            "ldct-tune=ldct_tf.tune.__main__:main",
            "ldct-export=ldct_tf.export.__main__:main",
            "ldct-denoise=ldct_tf.denoise.__main__:main",
            "ldct-audit=ldct_tf.audit.__main__:main",
            "ldct-evaluate=ldct_tf.evaluate.__main__:main",
            "ldct-demo=ldct_tf.demo.__main__:main",
            "ldct-node=ldct_tf.node.__main__:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Intended Audience :: Science/Research",
    ],
)
