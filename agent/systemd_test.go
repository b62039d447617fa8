package agent

import (
	"os/exec"
	"regexp"
	"testing"
)

// TestUnitSecurityRating runs systemd's own offline assessment of the unit
// file: it must rate "OK" or better ("SAFE", "PERFECT"). make test installs
// systemd, so this only skips when run by hand on a machine without it.
func TestUnitSecurityRating(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	out, err := exec.Command(sa, "security", "--offline=true", "../systemd/gwagent.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for gwagent.service: ([0-9.]+) (\w+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no rating in output:\n%s", out)
	}
	if rating := string(m[2]); rating != "OK" && rating != "SAFE" && rating != "PERFECT" {
		t.Fatalf("unit rated %s %s; want OK or better", m[1], rating)
	}
}
