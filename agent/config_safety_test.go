package agent

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A config path that is not a regular file is refused at once with a clear
// error: a FIFO would block `gwagent status` for ever, /dev/zero would eat
// all memory.
func TestConfigReadSafely(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.toml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	zero := filepath.Join(dir, "zero.toml")
	os.Symlink("/dev/zero", zero)
	huge := filepath.Join(dir, "huge.toml")
	os.WriteFile(huge, []byte("# "+strings.Repeat("x", 2<<20)+"\n"+minimal), 0o600)
	good := filepath.Join(dir, "good.toml")
	os.WriteFile(good, []byte(minimal), 0o600)
	link := filepath.Join(dir, "link.toml")
	os.Symlink(good, link)
	for _, c := range []struct{ path, want string }{
		{fifo, "is a FIFO, not a regular file"},
		{zero, "is a device, not a regular file"},
		{dir, "is a directory, not a regular file"},
		{huge, "a config file may have at most"},
		{link, ""},
		{filepath.Join(dir, "missing.toml"), "copy configs/gwagent.toml there"},
	} {
		done := make(chan error, 1)
		go func() { _, err := LoadConfig(c.path); done <- err }()
		select {
		case err := <-done:
			if c.want == "" {
				if err != nil {
					t.Errorf("%s: %v", filepath.Base(c.path), err)
				}
				continue
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: %v, want %q", filepath.Base(c.path), err, c.want)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: LoadConfig hangs", filepath.Base(c.path))
		}
	}
}

// Type errors name their line, durations included.
func TestConfigTypeErrorsHaveLines(t *testing.T) {
	for _, c := range []struct{ text, want string }{
		{minimal + "[telemetry]\ninterval = 5\n", "cfg.toml:13:12: telemetry.interval must be a duration in quotes"},
		{minimal + "[renewal]\njitter = 1.5\n", "cfg.toml:13:10: renewal.jitter must be a duration"},
		{minimal + "[hub]\nkeep_alive = true\n", "cfg.toml:13:14: hub.keep_alive must be a duration"},
		{minimal + "[telemetry]\ninterval = \"5x\"\n", "cfg.toml:13:12"},
		{minimal + "[outbox]\nmax_bytes = \"big\"\n", "cfg.toml:13:13"},
	} {
		_, err := ParseConfig("/etc/gw/cfg.toml", []byte(c.text))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.text[len(minimal):], err, c.want)
		}
	}
}

// Relative paths in key URIs are relative to the config file, as its
// header says, not to the working directory.
func TestConfigKeyURIsRelativeToFile(t *testing.T) {
	t.Chdir("/")
	text := strings.NewReplacer(
		`key = "file:/s/onb.key"`, `key = "tpm2:socket=run/swtpm.sock;blob=keys/onb.tpmkey"`,
		`key = "file:/s/op.key"`, `key = "file:keys/op.key"`).Replace(minimal)
	c, err := ParseConfig("/etc/gw/cfg.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.Operational.Key != "file:/etc/gw/keys/op.key" {
		t.Errorf("operational key %q", c.Operational.Key)
	}
	if !strings.Contains(c.Onboarding.Key, "blob=/etc/gw/keys/onb.tpmkey") || !strings.Contains(c.Onboarding.Key, "socket=/etc/gw/run/swtpm.sock") {
		t.Errorf("onboarding key %q", c.Onboarding.Key)
	}
	p11 := strings.Replace(minimal, `key = "file:/s/op.key"`,
		`key = "pkcs11:token=gw;object=op?module-path=libsofthsm2.so&pin-source=pin.txt"`, 1)
	c, err = ParseConfig("/etc/gw/cfg.toml", []byte(p11))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(c.Operational.Key, "pin-source=/etc/gw/pin.txt") || !strings.Contains(c.Operational.Key, "module-path=libsofthsm2.so") {
		t.Errorf("pkcs11 key %q: pin-source must follow the config file, a bare module name the loader", c.Operational.Key)
	}
	tpm := strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"tpm\"\ntpm = \"tpm2:socket=run/swtpm.sock\"", 1)
	c, err = ParseConfig("/etc/gw/cfg.toml", []byte(tpm))
	if err != nil {
		t.Fatal(err)
	}
	if c.Onboarding.TPM != "tpm2:socket=/etc/gw/run/swtpm.sock" {
		t.Errorf("[onboarding] tpm %q", c.Onboarding.TPM)
	}
	abs := minimal
	c, _ = ParseConfig("/etc/gw/cfg.toml", []byte(abs))
	if c.Operational.Key != "file:/s/op.key" {
		t.Errorf("an absolute URI was rewritten: %q", c.Operational.Key)
	}
}
