{{- define "logpipe.name" -}}logpipe-operator{{- end -}}
{{- define "logpipe.fullname" -}}
{{- if contains "logpipe" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-logpipe" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "logpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "logpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "logpipe.labels" -}}
{{ include "logpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "logpipe.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "logpipe.agentImage" -}}
{{ .Values.agentImage.repository }}:{{ .Values.agentImage.tag | default .Chart.AppVersion }}
{{- end -}}
{{- /* The agents' ClusterRole: `logpipe-agent` for the release `logpipe`. */ -}}
{{- define "logpipe.agentClusterRole" -}}
{{ include "logpipe.fullname" . }}-agent
{{- end -}}
