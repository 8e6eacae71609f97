"""Data: images in, batches out (the first stage of the pipeline).

* :mod:`~bcu.data.imageset` -- the :class:`Images` contract and the resident :class:`ImageSet`;
* :mod:`~bcu.data.formats` -- the on-disk readers (IDX, CIFAR, .npz/.npy, image files and folders);
* :mod:`~bcu.data.load` -- :func:`load_dataset`, the one entry point, resident or streamed;
* :mod:`~bcu.data.stream` -- :class:`StreamingImages`, images read from disk batch by batch;
* :mod:`~bcu.data.augment` -- batched augmentation (crop, flip, mixup, noise blend, warp);
* :mod:`~bcu.data.synthetic` -- a synthetic task for tests and examples;
* :mod:`~bcu.data.sources` -- named unlabeled sources (``in-dist``, ``half-classes``, ...).
"""
from .augment import (AugmentConfig, augment, identity_grid, mixup, noise_blend, random_crop, random_hflip,
                      random_warp, smooth_field)
from .formats import IMAGE_EXTENSIONS, read_cifar_dir, read_idx, read_image, read_image_folder, read_npz
from .imageset import ImageSet, Images, batches, count_classes, pixel_stats, split, take, to_float
from .load import FASHION_MNIST_CLASSES, fashion_mnist_dir, load_dataset
from .stream import StreamingImages
from .synthetic import make_synthetic

__all__ = ["AugmentConfig", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "ImageSet", "Images", "StreamingImages",
           "augment", "batches", "count_classes", "fashion_mnist_dir", "identity_grid", "load_dataset",
           "make_synthetic", "mixup", "noise_blend", "pixel_stats", "random_crop", "random_hflip", "random_warp",
           "read_cifar_dir", "read_idx", "read_image", "read_image_folder", "read_npz", "smooth_field", "split",
           "take", "to_float"]
