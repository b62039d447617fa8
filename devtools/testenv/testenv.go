// Package testenv starts the real components gwagent's tests run against
// (swtpm, SoftHSM2 tokens, tinyproxy, tmpfs mounts) in temporary directories
// and stops them when the test ends. Only tests import it; the emulator has
// its own starter (azsim/azsimtest), so test support that needs no emulator
// does not link it.
//
// When GWAGENT_REQUIRE_DEVICES=1 (make test sets it), a missing binary fails
// the test instead of skipping it: CI must never pass by skipping the TPM or
// PKCS#11 tests.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// LookPath returns the path of a binary the test needs. If it is missing the
// test fails (GWAGENT_REQUIRE_DEVICES=1) or is skipped with a loud reason.
func LookPath(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := name + " not found: install Debian package " + debianPackage + " (make test does this via testdata/install-deps.sh)"
	if os.Getenv("GWAGENT_REQUIRE_DEVICES") == "1" {
		t.Fatal("REQUIRED COMPONENT MISSING: " + msg)
	}
	t.Skip("SKIPPING, component missing: " + msg)
	return ""
}
