package main

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime"
	"strings"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/backends"
	"github.com/gwagent/gwagent/keystore/pkcs11"
	"github.com/gwagent/gwagent/provisioning"
)

// errUsage marks errors already explained on stderr; main exits 2.
var errUsage = errors.New("usage")

// errHelp means -h or --help was given and the help printed: the command
// stops there, without acting, and gwagent exits 0.
var errHelp = errors.New("help requested")

type command struct {
	name, args, help string
	run              func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"version", "", "print version and build information", cmdVersion},
		{"keygen", "--key URI [--force]", "create a P-384 key; print its public key and fingerprint", cmdKeygen},
		{"csr", "--key URI --cn ID [--pem] [--out FILE]", "print a PKCS#10 CSR (ECDSA-SHA384, CN=ID) signed by the key", cmdCSR},
		{"onboard", "csr|install|tpm --config FILE ...", "factory step: onboarding key + CSR, then install the signed chain; or print the TPM's endorsement key for enrollment", cmdOnboard},
		{"provision", "--config FILE [--progress]", "get an operational certificate from DPS and store it", cmdProvision},
		{"run", "--config FILE", "run the agent (the systemd service's command)", cmdRun},
		{"status", "--config FILE", "show state, identity, certificate and outbox, also while the service runs", cmdStatus},
		{"renew", "--config FILE", "renew the certificate now (asks the running service, or runs alone)", cmdRenew},
		{"check", "[--config FILE] [--json]", "diagnose config, clock, keys, certificate, trust, network, permissions, service", cmdCheck},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: gwagent COMMAND [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %-42s %s\n", c.name, c.args, c.help)
	}
	fmt.Fprint(w, `
key URIs:
  file:/var/lib/gwagent/keys/device.key
  tpm2:device=/dev/tpmrm0;handle=0x81000100           (or socket=PATH for swtpm; blob=FILE)
  pkcs11:token=gw;object=device-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=FILE

Run 'gwagent COMMAND -h' for a command's flags.
`)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		usage(stderr)
		return errUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return nil
	case "-version", "--version":
		args[0] = "version"
	}
	for _, c := range commands() {
		if c.name == args[0] {
			if err := c.run(ctx, args[1:], stdout, stderr); !errors.Is(err, errHelp) {
				return err
			}
			return nil
		}
	}
	fmt.Fprintf(stderr, "gwagent: unknown command %q\n\n", args[0])
	usage(stderr)
	return errUsage
}

// flags returns a FlagSet that reports errors on stderr and whose parse
// errors map to errUsage.
func flags(name, args string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("gwagent "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: gwagent %s %s\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

func required(fs *flag.FlagSet, name, value string) error {
	if value == "" {
		fmt.Fprintf(fs.Output(), "--%s is required\n", name)
		fs.Usage()
		return errUsage
	}
	return nil
}

func cmdVersion(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("version", "", stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	p11 := "no (CGO-free build)"
	if pkcs11.Supported {
		p11 = "yes"
	}
	fmt.Fprintf(stdout, "gwagent %s\nbuilt:   %s\ngo:      %s %s/%s\nkeys:    file, tpm2, pkcs11: %s\n",
		version, orUnknown(buildTime), runtime.Version(), runtime.GOOS, runtime.GOARCH, p11)
	return nil
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// openKeyStore parses a key URI and opens its backend.
func openKeyStore(ctx context.Context, raw string) (*keystore.URI, keystore.KeyStore, error) {
	u, err := keystore.Parse(raw)
	if err != nil {
		return nil, nil, err
	}
	ks, err := backends.Open(ctx, u)
	if err != nil {
		return nil, nil, err
	}
	return u, ks, nil
}

func cmdKeygen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("keygen", "--key URI [--force]", stderr)
	keyURI := fs.String("key", "", "key URI of the key to create (file:, tpm2: or pkcs11:)")
	force := fs.Bool("force", false, "replace an existing key at that location (the old key is destroyed)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "key", *keyURI); err != nil {
		return err
	}
	u, ks, err := openKeyStore(ctx, *keyURI)
	if err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	defer ks.Close()
	signer, err := ks.CreateKey(ctx, u)
	if errors.Is(err, keystore.ErrKeyExists) && *force {
		del, ok := ks.(keystore.KeyDeleter)
		if !ok {
			return fmt.Errorf("keygen: %w; this backend cannot delete keys, remove it by hand", err)
		}
		if err := del.DeleteKey(ctx, u); err != nil {
			return fmt.Errorf("keygen --force: delete old key: %w", err)
		}
		signer, err = ks.CreateKey(ctx, u)
	}
	if errors.Is(err, keystore.ErrKeyExists) {
		return fmt.Errorf("keygen: %w (use --force to replace it, destroying the old key)", err)
	}
	if err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	return printPublicKey(stdout, u, signer.Public())
}

func printPublicKey(w io.Writer, u *keystore.URI, pub crypto.PublicKey) error {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "# key %s (ECDSA P-384)\n", u)
	fmt.Fprintf(w, "# SHA256 fingerprint of the public key (SubjectPublicKeyInfo): %s\n", fingerprint(der))
	return pem.Encode(w, &pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// fingerprint renders SHA-256 as colon-separated hex, as openssl does.
func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func cmdCSR(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("csr", "--key URI --cn ID [--pem] [--out FILE]", stderr)
	keyURI := fs.String("key", "", "key URI of an existing key")
	cn := fs.String("cn", "", "subject common name: the DPS registration id")
	asPEM := fs.Bool("pem", false, "PEM output (for openssl) instead of DPS's base64 DER")
	out := fs.String("out", "", "write to FILE (atomically) instead of stdout")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(fs, "key", *keyURI); err != nil {
		return err
	}
	if err := required(fs, "cn", *cn); err != nil {
		return err
	}
	u, ks, err := openKeyStore(ctx, *keyURI)
	if err != nil {
		return fmt.Errorf("csr: %w", err)
	}
	defer ks.Close()
	signer, err := ks.Signer(ctx, u)
	if err != nil {
		return fmt.Errorf("csr: %w", err)
	}
	der, err := provisioning.CSR(signer, *cn)
	if err != nil {
		return err
	}
	var data []byte
	if *asPEM {
		data = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	} else {
		data = []byte(provisioning.EncodeCSR(der))
	}
	if *out != "" {
		if err := atomicfile.Write(*out, data, 0o644); err != nil {
			return fmt.Errorf("csr: %w", err)
		}
		return nil
	}
	if !*asPEM {
		data = append(data, '\n')
	}
	_, err = stdout.Write(data)
	return err
}
