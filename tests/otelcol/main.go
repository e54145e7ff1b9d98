// A minimal OpenTelemetry Collector for `make bench`: the filelog receiver (CRI files,
// partial lines joined by its `container` operator) and the OTLP/HTTP exporter, nothing
// else. tests/testbed/build.sh otelcol builds it in the cache (never here) against the
// collector modules pinned in tests/testbed/versions.env, with go.mod.tmpl beside this file.
package main

import (
	"fmt"
	"os"

	"github.com/open-telemetry/opentelemetry-collector-contrib/receiver/filelogreceiver"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

// version is set by the build (-ldflags -X main.version=...).
var version = "dev"

func components() (otelcol.Factories, error) {
	factories := otelcol.Factories{
		// Without it the service has no telemetry providers (and no sent-records metric).
		Telemetry: otelconftelemetry.NewFactory(),
	}
	var err error
	if factories.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](filelogreceiver.NewFactory()); err != nil {
		return otelcol.Factories{}, err
	}
	if factories.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](otlphttpexporter.NewFactory()); err != nil {
		return otelcol.Factories{}, err
	}
	return factories, nil
}

func main() {
	settings := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{
			Command:     "otelcol-bench",
			Description: "filelog receiver + OTLP/HTTP exporter, for logpipe's make bench",
			Version:     version,
		},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{fileprovider.NewFactory()},
				// --config=/path/file.yaml without a scheme means a file.
				DefaultScheme: "file",
			},
		},
	}
	if err := otelcol.NewCommand(settings).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
