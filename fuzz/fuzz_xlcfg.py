"""The xl.cfg parser and validator (hypyr.toolstack.xlcfg.loads) on fuzzed text, seeded with
tests/unit/data/xlcfg and guided by dicts/xlcfg.dict.  Oracles: nothing but InvalidConfig (an
XlCfgError naming "FILE:LINE" or the file) escapes; a config that loads is valid by the
documented rules (a name the registry takes, 1 <= vcpus <= maxvcpus <= MAX_VCPUS,
memory <= maxmem, known actions, absolute kernel/ramdisk paths); no ERROR log line."""

import os

from _harness import check, check_rss, errors_logged, fuzz, instrumented, scratch

with instrumented():
    from hypyr.arch.x86.layout import MAX_VCPUS
    from hypyr.toolstack import domconfig, xlcfg
    from hypyr.toolstack.errors import InvalidConfig
    from hypyr.toolstack.names import name_problem

CWD = scratch("xlcfg")


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace") if data[:1] != b"\xff" else data[1:].decode("latin-1")
    try:
        cfg = xlcfg.loads(text, "<fuzz>", cwd=CWD)
    except InvalidConfig as e:
        check(str(e).startswith("<fuzz>"), f"an error that does not name the file: {e}")
        errors_logged(strict=True)
        return
    check(name_problem(cfg.name) is None, f"a config named {cfg.name!r} loaded")
    check(cfg.maxvcpus is not None and 1 <= cfg.vcpus <= cfg.maxvcpus <= MAX_VCPUS,
          f"vcpus {cfg.vcpus}, maxvcpus {cfg.maxvcpus}")
    check(cfg.maxmem is not None and 0 < cfg.memory <= cfg.maxmem, f"memory {cfg.memory}, maxmem {cfg.maxmem}")
    for a in (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash):
        check(a in domconfig.ACTIONS, f"action {a!r}")
    for p in (cfg.kernel, cfg.ramdisk):
        check(p is None or os.path.isabs(p), f"a relative path {p!r} stored")
    errors_logged(strict=True)
    check_rss()


if __name__ == "__main__":
    fuzz(one_input)
