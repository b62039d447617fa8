package tomlconf

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/duration"
)

type testConfig struct {
	Name     string            `toml:"name"`
	Interval duration.Duration `toml:"interval"`
	Hub      struct {
		Host  string             `toml:"host"`
		Retry *duration.Duration `toml:"retry"`
	} `toml:"hub"`
}

// Read takes regular files (and links to them) and refuses what would block
// or never end, each with a message that says what the path is.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "gwagent.toml")
	if err := os.WriteFile(good, []byte("name = \"gw\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.toml")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{good, link} {
		if b, err := Read(p); err != nil || string(b) != "name = \"gw\"\n" {
			t.Errorf("Read(%s) = %q, %v", p, b, err)
		}
	}

	fifo := filepath.Join(dir, "fifo.toml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Read(fifo); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("Read(FIFO) = %v, want 'not a regular file'", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read blocked on a FIFO")
	}

	if _, err := Read(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Read(directory) = %v, want 'not a regular file'", err)
	}

	big := filepath.Join(dir, "big.toml")
	if err := os.WriteFile(big, make([]byte, MaxBytes+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(big); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Errorf("Read(%d bytes) = %v, want a size error", MaxBytes+1, err)
	}

	// The open's error as it is, for the caller to say what to do.
	if _, err := Read(filepath.Join(dir, "missing.toml")); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("Read(missing) = %v, want fs.ErrNotExist naming the file", err)
	}
}

// Decode's errors name the file, the line (and column where the decoder
// knows it) and what to write instead.
func TestDecodeErrors(t *testing.T) {
	for _, c := range []struct {
		name, raw string
		want      []string
	}{
		{"unknown key", "name = \"gw\"\n[hub]\nhots = \"x\"\n", []string{"gw.toml:3:", `unknown key "hub.hots"`, "see example.toml"}},
		{"wrong type", "name = 5\n", []string{"gw.toml:1:", "string"}},
		{"duration as a number", "name = \"gw\"\ninterval = 5\n", []string{"gw.toml:2:", "interval must be a duration in quotes", `interval = "90s"`}},
		{"nested duration as a number", "[hub]\nretry = 30\n", []string{"gw.toml:2:", "hub.retry must be a duration in quotes", `retry = "90s"`}},
		{"bad syntax", "name = \"gw\n", []string{"gw.toml:1:"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var cfg testConfig
			err := Decode("gw.toml", []byte(c.raw), &cfg, "example.toml")
			if err == nil {
				t.Fatalf("decoded %q without an error", c.raw)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestDecodeGood(t *testing.T) {
	var cfg testConfig
	raw := "name = \"gw\"\ninterval = \"90s\"\n[hub]\nhost = \"h.example\"\nretry = \"2m\"\n"
	if err := Decode("gw.toml", []byte(raw), &cfg, "example.toml"); err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "gw" || cfg.Interval.Duration != 90*time.Second || cfg.Hub.Host != "h.example" ||
		cfg.Hub.Retry == nil || cfg.Hub.Retry.Duration != 2*time.Minute {
		t.Fatalf("decoded %+v", cfg)
	}
}
