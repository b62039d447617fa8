package main

import (
	"context"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
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

// exclusive loads the config at path and takes its state directory for this
// command (stopping the service that holds it, see holdState), with the key
// stores the command will open; done closes the stores, hands what the
// command created (the key that key names among it) to the service user and
// releases the directory.
func exclusive(ctx context.Context, path string, stderr io.Writer, key func(*agent.Config) string) (cfg *agent.Config, keys *agent.Keys, done func(), err error) {
	cfg, err = agent.LoadConfig(path)
	if err != nil {
		return nil, nil, nil, err
	}
	hold, err := holdState(ctx, cfg.StateDir, stderr, realHost)
	if err != nil {
		return nil, nil, nil, err
	}
	keys = agent.NewKeys()
	return cfg, keys, func() { keys.Close(); hold.release(ctx, key(cfg)) }, nil
}

func onboardingKey(cfg *agent.Config) string  { return cfg.Onboarding.Key }
func operationalKey(cfg *agent.Config) string { return cfg.Operational.Key }

func cmdOnboard(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	const help = "usage: gwagent onboard csr --config FILE [--out FILE]\n       gwagent onboard install --config FILE --chain FILE\n       gwagent onboard tpm (--config FILE | --tpm tpm2:device=/dev/tpmrm0) [--ek-out FILE]"
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintln(stderr, help)
		return errHelp
	}
	if len(args) == 0 || (args[0] != "csr" && args[0] != "install" && args[0] != "tpm") {
		fmt.Fprintln(stderr, help)
		return errUsage
	}
	switch args[0] {
	case "csr":
		return cmdOnboardCSR(ctx, args[1:], stdout, stderr)
	case "tpm":
		return cmdOnboardTPM(ctx, args[1:], stdout, stderr)
	}
	return cmdOnboardInstall(ctx, args[1:], stdout, stderr)
}

// cmdOnboardTPM prints what a DPS individual enrollment with TPM
// attestation needs: the registration id, the endorsement key and, when the
// TPM has one, its EK certificate.
func cmdOnboardTPM(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("onboard tpm", "(--config FILE | --tpm URI) [--ek-out FILE]", stderr)
	cfgPath := fs.String("config", "", "config file with [onboarding] kind = \"tpm\"")
	tpmURI := fs.String("tpm", "", "the TPM, tpm2:device=/dev/tpmrm0 or tpm2:socket=PATH (instead of --config)")
	ekOut := fs.String("ek-out", "", "also write the base64 endorsement key to `FILE` (for azsim enroll tpm --ek FILE)")
	if err := parse(fs, args); err != nil {
		return err
	}
	regID := ""
	switch {
	case *cfgPath != "" && *tpmURI != "":
		fmt.Fprintln(stderr, "give --config or --tpm, not both")
		return errUsage
	case *cfgPath != "":
		cfg, err := agent.LoadConfig(*cfgPath)
		if err != nil {
			return err
		}
		if cfg.Onboarding.Kind != agent.OnboardingTPM {
			return fmt.Errorf("onboard tpm: %s has [onboarding] kind = %q; TPM enrollment is for kind = \"tpm\" (or pass --tpm)", *cfgPath, cfg.Onboarding.Kind)
		}
		*tpmURI, regID = cfg.Onboarding.TPM, cfg.Identity.RegistrationID
	case *tpmURI == "":
		*tpmURI = "tpm2:device=/dev/tpmrm0"
	}
	keys := agent.NewKeys()
	defer keys.Close()
	o, err := agent.OnboardTPM(ctx, *tpmURI, regID, keys)
	if err != nil {
		return err
	}
	ek := base64.StdEncoding.EncodeToString(o.EndorsementKey)
	if *ekOut != "" {
		if err := atomicfile.Write(*ekOut, []byte(ek+"\n"), 0o644); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "registration_id: %s\nendorsement_key: %s\n", o.RegistrationID, ek)
	if o.EKCert == nil {
		fmt.Fprintln(stdout, "ek_certificate: none (the TPM has no EK certificate in NV index 0x01C00002)")
	} else {
		fmt.Fprintf(stdout, "ek_certificate: issuer %q, serial %s\n", o.EKCert.Issuer.String(), provisioning.FormatSerial(o.EKCert.SerialNumber))
		pem.Encode(stdout, &pem.Block{Type: "CERTIFICATE", Bytes: o.EKCert.Raw})
	}
	fmt.Fprintln(stderr, "Create an individual enrollment with TPM attestation in DPS for this registration id and endorsement key.")
	return nil
}

func cmdOnboardCSR(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("onboard csr", "--config FILE [--out FILE]", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	out := fs.String("out", "", "write the PEM CSR to FILE instead of stdout")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, keys, done, err := exclusive(ctx, *cfgPath, stderr, onboardingKey)
	if err != nil {
		return err
	}
	defer done()
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
	cfg, keys, done, err := exclusive(ctx, *cfgPath, stderr, onboardingKey)
	if err != nil {
		return err
	}
	defer done()
	chain, err := agent.OnboardInstall(ctx, cfg, keys, *chainFile, clock.Real{}.Now())
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
	cfg, keys, done, err := exclusive(ctx, *cfgPath, stderr, operationalKey)
	if err != nil {
		return err
	}
	defer done()
	opts := agent.ProvisionOptions{ClientVersion: "gwagent/" + version}
	if *progress {
		c := clock.Real{}
		start := c.Now()
		opts.Progress = func(s string) {
			fmt.Fprintf(stderr, "[%5.1fs] %s\n", clock.Since(c, start).Seconds(), s)
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
