package provisioning

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"unicode/utf8"

	"github.com/gwagent/gwagent/keystore"
)

// ValidateRegistrationID checks an id against DPS's rules for X.509
// registrations (the id becomes the certificate CN): 1 to 64 characters of
// ASCII letters, digits and - . _ :, ending with a letter, digit or '-'.
func ValidateRegistrationID(id string) error {
	if id == "" {
		return fmt.Errorf("registration id is empty; set it to the device's unique name")
	}
	if n := utf8.RuneCountInString(id); n > 64 {
		return fmt.Errorf("registration id %q is %d characters; DPS allows at most 64 for X.509 (it is the certificate CN)", id, n)
	}
	pos := 0
	for i, r := range id {
		pos++
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_' || r == ':'
		if ok {
			continue
		}
		what := fmt.Sprintf("character %q", r)
		if _, size := utf8.DecodeRuneInString(id[i:]); r == utf8.RuneError && size == 1 {
			what = fmt.Sprintf("byte %#x, which is not UTF-8,", id[i])
		} else if r >= utf8.RuneSelf {
			what = fmt.Sprintf("character %q (U+%04X, not ASCII)", r, r)
		}
		return fmt.Errorf("registration id %q has %s at position %d; DPS allows letters (ASCII only: a-z, A-Z), digits and - . _ :", id, what, pos)
	}
	if last := id[len(id)-1]; last == '.' || last == '_' || last == ':' {
		return fmt.Errorf("registration id %q ends with %q; DPS requires a letter, digit or '-' at the end", id, last)
	}
	return nil
}

// CSR builds a PKCS#10 certificate signing request for signer's key with
// subject CN = cn, signed with ECDSA-SHA384, and returns its DER. The key
// must be ECDSA P-384, which is what Azure's certificate management issues
// for.
func CSR(signer crypto.Signer, cn string) ([]byte, error) {
	if err := ValidateRegistrationID(cn); err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	if !keystore.IsP384(signer.Public()) {
		return nil, fmt.Errorf("csr: %w: key is %T; create a P-384 key with gwagent keygen", keystore.ErrUnsupportedCurve, signer.Public())
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:            pkix.Name{CommonName: cn},
		SignatureAlgorithm: x509.ECDSAWithSHA384,
	}, signer)
	if err != nil {
		return nil, fmt.Errorf("csr: sign: %w", err)
	}
	return der, nil
}

// EncodeCSR renders a CSR as DPS and the hub's certificate API want it:
// standard base64 of the DER, no PEM armour, no newlines.
func EncodeCSR(der []byte) string { return base64.StdEncoding.EncodeToString(der) }
