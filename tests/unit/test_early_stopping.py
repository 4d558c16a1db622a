from trainer.early_stopping import EarlyStopping


def test_max_mode_stops_after_patience_without_improvement():
    es = EarlyStopping("max", patience=2, min_delta=0.01)
    assert es.update(0.5, 0)
    assert es.update(0.6, 1)
    assert not es.update(0.605, 2)  # within min_delta: not an improvement
    assert not es.should_stop
    assert not es.update(0.59, 3)
    assert es.should_stop and es.best == 0.6 and es.best_epoch == 1


def test_min_mode_and_state_dict():
    es = EarlyStopping("min", patience=1)
    es.update(1.0, 0)
    es.update(0.8, 1)
    assert not es.should_stop
    es.update(0.9, 2)
    assert es.should_stop
    assert es.state_dict() == {
        "mode": "min",
        "patience": 1,
        "min_delta": 0.0,
        "best": 0.8,
        "best_epoch": 1,
        "bad_epochs": 1,
    }
