"""The names design.md promises are importable from the package root and are the real ones."""
import mergelab as ml


def test_public_names_exist():
    for name in ml.__all__:
        assert getattr(ml, name) is not None, name


def test_public_names_are_the_implementations():
    from mergelab.align import weight_matching
    from mergelab.merge import merge
    from mergelab.repair import tact
    from mergelab.stats import diagonal_fisher
    assert ml.merge is merge and ml.weight_matching is weight_matching
    assert ml.tact is tact and ml.diagonal_fisher is diagonal_fisher
