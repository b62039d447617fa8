package main

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
)

// isTerminal reports whether w is a character device (progress on by default).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func cmdOnboard(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "csr" && args[0] != "install") {
		fmt.Fprintln(stderr, "usage: gwagent onboard csr --config FILE [--out FILE]\n       gwagent onboard install --config FILE --chain FILE")
		return errUsage
	}
	if args[0] == "csr" {
		return cmdOnboardCSR(ctx, args[1:], stdout, stderr)
	}
	return cmdOnboardInstall(ctx, args[1:], stdout, stderr)
}

func cmdOnboardCSR(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("onboard csr", "--config FILE [--out FILE]", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	out := fs.String("out", "", "write the PEM CSR to FILE instead of stdout")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	keys := agent.NewKeys()
	defer keys.Close()
	der, created, err := agent.OnboardCSR(ctx, cfg, keys)
	if err != nil {
		return err
	}
	u, _ := keystore.Parse(cfg.Onboarding.Key)
	verb := "reused the existing"
	if created {
		verb = "created a new"
	}
	fmt.Fprintf(stderr, "%s onboarding key %s; CSR for CN=%s follows. Have the factory CA sign it, then run `gwagent onboard install --chain FILE`.\n",
		verb, u, cfg.Identity.RegistrationID)
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	if *out != "" {
		return atomicfile.Write(*out, data, 0o644)
	}
	_, err = stdout.Write(data)
	return err
}

func cmdOnboardInstall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("onboard install", "--config FILE --chain FILE", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	chainFile := fs.String("chain", "", "PEM file from the factory CA: the onboarding certificate, then its intermediates")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "chain", *chainFile); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	keys := agent.NewKeys()
	defer keys.Close()
	chain, err := agent.OnboardInstall(ctx, cfg, keys, *chainFile, time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "installed onboarding chain for CN=%s (issuer %q, %d certificates, valid until %s) at %s\n",
		chain[0].Subject.CommonName, chain[0].Issuer.CommonName, len(chain), chain[0].NotAfter.UTC().Format(time.RFC3339), cfg.Onboarding.Chain)
	return nil
}

func cmdProvision(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("provision", "--config FILE [--progress]", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	progress := fs.Bool("progress", isTerminal(stderr), "show each step on stderr (default: on when stderr is a terminal)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	keys := agent.NewKeys()
	defer keys.Close()
	opts := agent.ProvisionOptions{ClientVersion: "gwagent/" + version}
	if *progress {
		start := time.Now()
		opts.Progress = func(s string) {
			fmt.Fprintf(stderr, "[%5.1fs] %s\n", time.Since(start).Seconds(), s)
		}
	}
	id, err := agent.Provision(ctx, cfg, keys, opts)
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	u, _ := keystore.Parse(id.KeyURI)
	fmt.Fprintf(stdout, "assigned hub:   %s\ndevice id:      %s\ncertificate:    serial %s, valid until %s\nchain:          %s\noperational key: %s\n",
		id.AssignedHub, id.DeviceID, id.Serial, id.NotAfter.Format(time.RFC3339), id.ChainPath, u)
	return nil
}
