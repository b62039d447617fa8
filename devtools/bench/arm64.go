package main

import (
	"fmt"
	"os/exec"
	"time"
)

// arm64Drain is the drain's CPU figure for the arm64 builds under
// qemu-user, as an indication of the ratio on a gateway's core: the agent
// built for arm64 drains n queued spool files after an outage, and the
// bench built for arm64 then runs the paho reference, both under the same
// emulator. qemu translates every instruction and passes system calls
// through, so the ratio weighs user-space code more than the native run
// does; it is not a target (issue 22 asks for it as an indication).
func (b *bench) arm64Drain(qemu, gw, self string, n int) ([]row, error) {
	emu, err := exec.LookPath(qemu)
	if err != nil {
		return nil, fmt.Errorf("arm64 drain: %w (make bench installs qemu-user-static)", err)
	}
	d, reg := b.device(b.info, b.az, "1h", "debug")
	b.tel.track(reg)
	cmd, err := b.startWith(d, emu, gw)
	if err != nil {
		return nil, err
	}
	defer stop(cmd)
	if !waitFor(120*time.Second, func() bool { return b.tel.count(reg) >= 1 }) {
		return nil, fmt.Errorf("arm64 drain: no telemetry from the agent under %s", qemu)
	}
	r, err := b.drainOnce(d, reg, cmd, n, 0, false)
	if err != nil {
		return nil, fmt.Errorf("arm64 %w", err)
	}
	if r.ref, err = b.pahoProcess(n, "bench-paho-arm64", emu, self); err != nil {
		return nil, fmt.Errorf("arm64 %w", err)
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	return []row{
		{"arm64 under qemu-user: agent CPU per drained message", us(r.cpu), "us", "", "", fmt.Sprintf("%d queued; as the native figure: hub accepts again -> spool emptied; one round", n)},
		{"arm64 under qemu-user: paho CPU per message", us(r.ref.cpu), "us", "", "", fmt.Sprintf("the same reference built for arm64, right after the round (at %.0f msg/s)", r.ref.rate)},
		{"arm64 under qemu-user: agent CPU / paho CPU", float64(r.cpu) / float64(r.ref.cpu), "x", "", "", "an indication: qemu's translation weighs user-space code more than a real core does"},
	}, nil
}
