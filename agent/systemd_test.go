package agent

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
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

// TestUnitVerifies runs `systemd-analyze verify` on the unit with ExecStart
// pointing at an executable that exists: it must print nothing. It also
// checks that every file of this repository the unit names exists.
func TestUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	unit, err := os.ReadFile("../systemd/gwagent.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, sm := range regexp.MustCompile(`(?m)(?:^|[^/\w])((?:systemd|configs|testdata)/[\w./-]+)`).FindAllSubmatch(unit, -1) {
		m := sm[1]
		if _, err := os.Stat(filepath.Join("..", strings.TrimRight(string(m), "."))); err != nil {
			t.Errorf("the unit names %s, which does not exist", m)
		}
	}
	if !bytes.Contains(unit, []byte("ReadWritePaths=/var/spool/gwagent")) {
		t.Error("the unit does not let the service write the spool (ReadWritePaths=/var/spool/gwagent)")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "gwagent.service")
	os.WriteFile(p, bytes.ReplaceAll(unit, []byte("/usr/bin/gwagent"), []byte(self)), 0o644)
	out, err := exec.Command(sa, "verify", p).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
