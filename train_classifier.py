"""Train the classifier whose features score samples (`config.eval.classifier_dir`).

    python train_classifier.py --output_dir=classifiers/fashion_mnist

Reads the dataset through TFDS (prepared offline from the official files, as
training does), trains `ddpm_jax.evaluation.classifier.Classifier`, prints the test
accuracy and saves the network with Orbax. The paths may be relative, `~/...`,
absolute or gs://. A classifier below
--min_accuracy is not saved: its features would make a poor yardstick.
"""

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from ddpm_jax.data import input_pipeline  # noqa: E402
from ddpm_jax.evaluation import classifier  # noqa: E402
from ddpm_jax.runtime import console, storage  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Where to save the classifier.", required=True)
flags.DEFINE_string("dataset", "fashion_mnist", "A labelled TFDS dataset: fashion_mnist | mnist.")
flags.DEFINE_integer("image_size", 28, "Image height and width of the dataset.")
flags.DEFINE_integer("channels", 1, "Image channels of the dataset.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (default $TFDS_DATA_DIR).")
flags.DEFINE_string("manual_dir", None,
                    "Directory of the official files (default $DDPM_JAX_MANUAL_DIR).")
flags.DEFINE_integer("epochs", classifier.TrainSettings.epochs, "Passes over the training set.")
flags.DEFINE_integer("batch_size", classifier.TrainSettings.batch_size, "Batch size.")
flags.DEFINE_float("learning_rate", classifier.TrainSettings.learning_rate, "Adam's step size.")
flags.DEFINE_integer("num_train_images", 0, "Use only the first N training images; 0 = all.")
flags.DEFINE_integer("seed", 0, "Initialisation and shuffling seed.")
flags.DEFINE_float("min_accuracy", 0.9, "Refuse to save a classifier below this test accuracy.")


def main(argv):
    del argv
    console.quiet_libraries()
    storage.absolute_flags("output_dir", "tfds_data_dir", "manual_dir")
    open_split = lambda split: input_pipeline.open_source(  # noqa: E731
        FLAGS.dataset, split, image_size=FLAGS.image_size, channels=FLAGS.channels,
        data_dir=FLAGS.tfds_data_dir, manual_dir=FLAGS.manual_dir)
    train_images, train_labels = input_pipeline.load_labeled(
        open_split("train"), FLAGS.num_train_images or None)
    test_images, test_labels = input_pipeline.load_labeled(open_split("test"))
    settings = classifier.TrainSettings(
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed)
    model = classifier.Classifier(num_classes=int(train_labels.max()) + 1)
    start = time.time()
    params = classifier.train_classifier(model, train_images, train_labels, settings)
    train_s = time.time() - start
    accuracy = classifier.accuracy(classifier.make_apply_fn(model), params, test_images,
                                   test_labels)
    print(f"test accuracy {accuracy:.4f} on {len(test_images)} images "
          f"(trained on {len(train_images)} images in {train_s:.0f} s)", flush=True)
    if accuracy < FLAGS.min_accuracy:
        print(f"not saved: test accuracy {accuracy:.4f} < --min_accuracy={FLAGS.min_accuracy}",
              file=sys.stderr)
        sys.exit(1)
    classifier.save_classifier(FLAGS.output_dir, model, params, {
        "dataset": FLAGS.dataset, "test_accuracy": accuracy, "num_train_images": len(train_images),
        "settings": vars(settings)})
    print(f"saved to {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
