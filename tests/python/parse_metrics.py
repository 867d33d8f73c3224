"""Reads Prometheus's text format on standard input with Prometheus's own Python parser
(prometheus_client.parser) and writes what it read as JSON: every family's type, and every
sample with its labels and value. The Rust metrics tests call it (support::python), so that
/metrics is judged by a parser nobody here wrote; a text it cannot parse fails them.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    families = {}
    samples = []
    for family in text_string_to_metric_families(sys.stdin.read()):
        families[family.name] = family.type
        for sample in family.samples:
            samples.append(
                {"name": sample.name, "labels": sample.labels, "value": sample.value}
            )
    json.dump({"families": families, "samples": samples}, sys.stdout)


if __name__ == "__main__":
    main()
