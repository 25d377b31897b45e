"""Self-supervised learning with a local rule (Tang, Yang & Amit 2022).

An encoder trained with the contrastive hinge loss, where each stage learns from a *local*
signal: ``rule="urf"`` (updated random feedback: the error reaches a stage through fixed random
matrices that are themselves updated, not through the transposed forward weights) and
``schedule="rll"`` (random layer-wise: each batch trains one stage, picked at random, on its own
head). The frozen embedding is read out by a linear probe; the random-encoder baseline (the same
network untrained) comes with it.

Run: ``python examples/ssl_local_rule.py``
"""

from __future__ import annotations

from dynsim.pipelines.ssl import SSLConfig, run_ssl


def main(quick: bool = False) -> dict:
    """Train on digits; return the probe accuracy of the trained and of the random encoder."""
    config = SSLConfig(data="digits", schedule="rll", rule="urf", epochs=1 if quick else 6,
                       n_train=200 if quick else None, n_test=100 if quick else None, batch_size=50,
                       probe_epochs=2 if quick else 30, seed=0, threads=1)
    result = run_ssl(config, progress=False)
    final = result["final"]
    print(f"{config.schedule.upper()} / {config.rule.upper()}: probe accuracy {100 * final['test_accuracy']:.1f} % "
          f"(random encoder {100 * final['random_encoder_accuracy']:.1f} %), one seed, "
          f"train {final['train_seconds']:.1f} s")
    return final


if __name__ == "__main__":
    main()
