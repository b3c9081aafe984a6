"""The package's import graph: no module imports one that imports it back, directly or through others."""

import grimp


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("lit_anomaly")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append((module, *back))
    assert cycles == []


def test_the_runtime_layers_never_import_upwards():
    graph = grimp.build_graph("lit_anomaly")
    lower = ("lit_anomaly.utils", "lit_anomaly.metrics", "lit_anomaly.data", "lit_anomaly.models")
    upper = ("lit_anomaly.cli", "lit_anomaly.pipelines", "lit_anomaly.callbacks", "lit_anomaly.reporting")
    for low in lower:
        for high in upper:
            assert not graph.chain_exists(importer=low, imported=high, as_packages=True), (low, high)
