package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore/pkcs11"
)

// gw runs the CLI in-process and returns stdout, stderr and the error.
func gw(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, &out, &errb)
	return out.String(), errb.String(), err
}

// checkCSR asserts what DPS and the issue demand of a CSR: P-384,
// ECDSA-SHA384, CN = registration id, valid signature; and, when openssl is
// installed, that `openssl req -verify` accepts it.
func checkCSR(t *testing.T, der []byte, cn string) {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR signature: %v", err)
	}
	if csr.SignatureAlgorithm != x509.ECDSAWithSHA384 || csr.Subject.CommonName != cn {
		t.Fatalf("CSR: %v, CN %q; want ECDSA-SHA384, CN %q", csr.SignatureAlgorithm, csr.Subject.CommonName, cn)
	}
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Log("openssl not installed; skipped the openssl cross-check")
		return
	}
	cmd := exec.Command(openssl, "req", "-verify", "-noout", "-text")
	cmd.Stdin = bytes.NewReader(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("openssl req -verify: %v\n%s", err, out)
	}
	for _, want := range []string{"verify OK", "CN = " + cn, "384 bit", "ecdsa-with-SHA384", "NIST CURVE: P-384"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("openssl output lacks %q:\n%s", want, out)
		}
	}
}

// keygenAndCSR is the user's walk: keygen, keygen again (refused), keygen
// --force, csr in both encodings, csr to a file. Backend tests reuse it.
func keygenAndCSR(t *testing.T, key string) {
	out, _, err := gw(t, "keygen", "--key", key)
	if err != nil {
		t.Fatalf("keygen: %v", err)
	}
	if !strings.Contains(out, "BEGIN PUBLIC KEY") || !strings.Contains(out, "SHA256 fingerprint") {
		t.Fatalf("keygen output lacks the public key or fingerprint:\n%s", out)
	}
	block, _ := pem.Decode([]byte(out[strings.Index(out, "-----BEGIN"):]))
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}

	if _, _, err := gw(t, "keygen", "--key", key); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second keygen: got %v, want refusal that mentions --force", err)
	}

	b64, _, err := gw(t, "csr", "--key", key, "--cn", "gw-cli-01")
	if err != nil {
		t.Fatalf("csr: %v", err)
	}
	line := strings.TrimSuffix(b64, "\n")
	if strings.ContainsAny(line, "\n -") {
		t.Fatalf("default csr output is not bare base64: %q", b64)
	}
	der, err := base64.StdEncoding.DecodeString(line)
	if err != nil {
		t.Fatal(err)
	}
	checkCSR(t, der, "gw-cli-01")
	csr, _ := x509.ParseCertificateRequest(der)
	if !csr.PublicKey.(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("CSR key is not the key keygen printed")
	}

	pemOut, _, err := gw(t, "csr", "--key", key, "--cn", "gw-cli-01", "--pem")
	if err != nil {
		t.Fatal(err)
	}
	block, _ = pem.Decode([]byte(pemOut))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		t.Fatalf("--pem output: %q", pemOut)
	}
	checkCSR(t, block.Bytes, "gw-cli-01")

	outFile := filepath.Join(t.TempDir(), "req.b64")
	if _, _, err := gw(t, "csr", "--key", key, "--cn", "gw-cli-01", "--out", outFile); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(outFile)
	if bytes.ContainsAny(data, "\n\r") {
		t.Fatal("--out file contains newlines")
	}

	out, _, err = gw(t, "keygen", "--key", key, "--force")
	if err != nil {
		t.Fatalf("keygen --force: %v", err)
	}
	block, _ = pem.Decode([]byte(out[strings.Index(out, "-----BEGIN"):]))
	if newPub, err := x509.ParsePKIXPublicKey(block.Bytes); err != nil || pub.(*ecdsa.PublicKey).Equal(newPub) {
		t.Fatalf("keygen --force did not make a new key (%v)", err)
	}
}

func TestKeygenCSRFile(t *testing.T) {
	keygenAndCSR(t, "file:"+filepath.Join(t.TempDir(), "keys", "device.key"))
}

func TestKeygenCSRTPM(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	t.Run("blob", func(t *testing.T) {
		keygenAndCSR(t, "tpm2:socket="+sw.Sock+";blob="+filepath.Join(t.TempDir(), "device.tpmkey"))
	})
	t.Run("handle", func(t *testing.T) {
		keygenAndCSR(t, "tpm2:socket="+sw.Sock+";handle=0x81000100")
	})
}

func TestKeygenCSRPKCS11(t *testing.T) {
	if !pkcs11.Supported {
		t.Skip("this build has no PKCS#11 (nopkcs11 or CGO_ENABLED=0); make test uses the full build")
	}
	h := testenv.StartSoftHSM(t, "gw", "4321")
	keygenAndCSR(t, h.URI("device-key"))
}

func TestCLIErrors(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose.key")
	if _, _, err := gw(t, "keygen", "--key", "file:"+loose); err != nil {
		t.Fatal(err)
	}
	os.Chmod(loose, 0o644)
	good := filepath.Join(dir, "good.key")
	if _, _, err := gw(t, "keygen", "--key", "file:"+good); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		args  []string
		usage bool   // exit 2
		want  string // substring of the error
	}{
		{"fail/no-command", nil, true, ""},
		{"fail/unknown-command", []string{"frobnicate"}, true, ""},
		{"fail/keygen-no-key", []string{"keygen"}, true, ""},
		{"fail/csr-no-cn", []string{"csr", "--key", "file:" + loose}, true, ""},
		{"fail/unknown-scheme", []string{"keygen", "--key", "tpm:handle=1"}, false, "use file:, tpm2: or pkcs11:"},
		{"fail/malformed-uri", []string{"keygen", "--key", "tpm2:handle=0x1"}, false, "persistent handle"},
		{"fail/key-not-found", []string{"csr", "--key", "file:" + filepath.Join(dir, "nope.key"), "--cn", "a"}, false, "gwagent keygen"},
		{"fail/loose-permissions", []string{"csr", "--key", "file:" + loose, "--cn", "a"}, false, "chmod 600"},
		{"fail/bad-cn", []string{"csr", "--key", "file:" + good, "--cn", "a b"}, false, "DPS allows letters"},
		{"fail/pin-redacted", []string{"keygen", "--key", "pkcs11:token=gw;object=k?module-path=/nonexistent/lib.so&pin-value=hunter2"}, false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, err := gw(t, tc.args...)
			if err == nil {
				t.Fatal("succeeded")
			}
			if tc.usage != errors.Is(err, errUsage) {
				t.Fatalf("usage error = %v, want %v (err %v)", errors.Is(err, errUsage), tc.usage, err)
			}
			if tc.usage && !strings.Contains(stderr, "usage:") {
				t.Fatalf("usage error without usage text: %q", stderr)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q lacks %q", err, tc.want)
			}
			if strings.Contains(err.Error()+stderr, "hunter2") {
				t.Fatalf("PIN leaked: %v", err)
			}
		})
	}
}
