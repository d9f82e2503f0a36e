"""Entry point: `python cli.py fit --config configs/dcgan_fashion_mnist.yaml` (same as the `gangen` command)."""

from gangen.cli import main

if __name__ == "__main__":
    main()
