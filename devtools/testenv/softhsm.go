package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// SoftHSM is a SoftHSM2 token in a temporary directory.
type SoftHSM struct {
	Module string // the PKCS#11 module path
	Label  string
	PIN    string
	// PINFile holds the PIN (0600), for pin-source=.
	PINFile string
}

// softhsmModules are where Debian puts the module.
var softhsmModules = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
}

// StartSoftHSM initialises a fresh token with label and PIN in its own
// token directory (SOFTHSM2_CONF is set for the test).
func StartSoftHSM(t *testing.T, label, pin string) *SoftHSM {
	t.Helper()
	return StartSoftHSMAt(t, "", label, pin)
}

// StartSoftHSMAt is StartSoftHSM with the token directory at tokens (made
// if missing), for a token on a particular file system; "" is a
// temporary directory.
func StartSoftHSMAt(t *testing.T, tokens, label, pin string) *SoftHSM {
	t.Helper()
	util := LookPath(t, "softhsm2-util", "softhsm2")
	module := ""
	for _, m := range softhsmModules {
		if _, err := os.Stat(m); err == nil {
			module = m
			break
		}
	}
	if module == "" {
		t.Fatal("softhsm2-util is installed but libsofthsm2.so is not where Debian puts it")
	}
	// Not t.TempDir(): softhsm2.conf treats '#' (from a subtest name) as
	// the start of a comment.
	dir, err := os.MkdirTemp("", "softhsm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if tokens == "" {
		tokens = filepath.Join(dir, "tokens")
	}
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600)
	t.Setenv("SOFTHSM2_CONF", conf)
	out, err := exec.Command(util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "so-"+pin).CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v: %s", err, out)
	}
	pf := filepath.Join(dir, "pin")
	os.WriteFile(pf, []byte(pin+"\n"), 0o600)
	return &SoftHSM{Module: module, Label: label, PIN: pin, PINFile: pf}
}

// URI is a pkcs11: key URI for object on this token, PIN from the file.
func (h *SoftHSM) URI(object string) string {
	return "pkcs11:token=" + h.Label + ";object=" + object + "?module-path=" + h.Module + "&pin-source=" + h.PINFile
}
